"""Rank, world size and process-group setup from the torchrun environment.

`torchrun --nproc_per_node=K` (or any launcher that follows its contract) sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Without them everything here reports a
single process and does nothing, so callers never need two code paths for setup.
"""

from __future__ import annotations

import os
from datetime import timedelta

from .errors import VitError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise VitError(
            f"environment variable {name}={value!r} is not an integer; unset it or fix the launcher"
        ) from None


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its node: the GPU index it should use."""
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_distributed() -> bool:
    return world_size() > 1


def launched_distributed() -> bool:
    """Started by a launcher for more than one process (WORLD_SIZE > 1), from the environment
    alone: what can be asked before torch is imported."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group the environment describes; False when running alone.

    `backend` defaults to nccl when CUDA is available and gloo otherwise. Calling it again
    once initialised is harmless.
    """
    if not is_distributed():
        return False
    if _initialized():
        return True
    import torch
    import torch.distributed as dist

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise VitError(
            f"WORLD_SIZE={world_size()} but {' and '.join(missing)} not set; launch with torchrun, "
            "or unset WORLD_SIZE to run as one process"
        )
    size, me = world_size(), rank()
    if not 0 <= me < size:
        raise VitError(f"RANK={me} is outside WORLD_SIZE={size}; fix the launcher's environment")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend=backend, rank=me, world_size=size, timeout=timedelta(seconds=timeout_s)
    )
    return True


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Leave the process group (only if this module's caller joined one)."""
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def shard(count: int, rank_: int | None = None, world: int | None = None) -> range:
    """Positions 0..count-1 that belong to a rank: every world-th one, starting at its rank.

    Strided rather than contiguous so that neighbouring inputs (often similar in size) spread
    over the ranks; the shards are disjoint and together cover every position exactly once.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return range(rank_, count, world)


def broadcast_object(value=None, source: int = 0):
    """`value` from rank `source` on every rank (unchanged when not distributed)."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = [value if rank() == source else None]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def gather_object(value, destination: int = 0) -> list | None:
    """A list of every rank's `value` (rank order) on `destination`, None elsewhere."""
    if not _initialized():
        return [value]
    import torch.distributed as dist

    gathered = [None] * world_size() if rank() == destination else None
    dist.gather_object(value, gathered, dst=destination)
    return gathered
