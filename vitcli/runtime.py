"""Where and how a command runs: device, dtype, worker counts, threads, OpenMP policy.

Decided once, here, for every command, so that `--device`, `--dtype` and `--workers` mean the
same thing in predict, attention, embed, train and eval. Importing this module does not import
torch; the functions that need it import it when called.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InputError, OptionError

if TYPE_CHECKING:
    import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
MAX_WORKERS = 64  # decoding processes; resolve_workers also clamps to the CPUs here

# Worker processes beyond this many per CPU only add memory and start-up time.
MAX_WORKERS_PER_CPU = 1

# Sizes an option or a file may ask for, checked before anything is allocated, with the limit
# in the message: one definition for every command (weights/limits.py bounds the rest).
MAX_BATCH = 4096  # images per forward pass: far past any speed-up, short of absurd
MAX_IMAGE_SIDE = 4096  # pixels per side of a model input (export, train, checkpoints)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Decoding processes that keep the model fed without starving its threads: half the CPUs,
    at least 1, at most 8."""
    return max(1, min(8, cpu_count() // 2))


def default_training_workers() -> int:
    """Decoding processes for `vit train`: `default_workers`, except none on 2 CPUs or fewer.

    A training step runs on every CPU (torch's threads); on 2 cores a decoding worker can only
    take its turns from one of them, and every parallel region of the step then waits for the
    thread that lost its core. Measured on 2 cores (bench/README.md, "Training input"), one
    epoch end to end against the step alone on tensors: 85% with the main process decoding
    between steps, 75% with one worker (Ti/8 at 64 px, median of 6 rounds); 92% against 89%
    (Ti/16 depth 6 at 224 px, 4 rounds). With more CPUs the workers have cores of their own.
    """
    return 0 if cpu_count() <= 2 else default_workers()


def resolve_workers(
    requested: int | None, what: str = "--workers", default: int | None = None
) -> tuple[int, str | None]:
    """(workers, warning or None). None picks `default` (else `default_workers`); a request
    above the CPU count is clamped to it (each worker is a process with its own copy of the
    decoder and buffers)."""
    if requested is None:
        return (default if default is not None else default_workers()), None
    check_workers(requested, what)
    limit = cpu_count() * MAX_WORKERS_PER_CPU
    if requested > limit:
        return limit, f"{what} {requested} is more than the {limit} CPUs here; using {limit}"
    return requested, None


def model_threads(all_threads: int, workers: int, decoding_left: int) -> int:
    """torch threads for the next forward pass on a CPU it shares with `workers` decoding
    processes: what the decoders leave (at least 1) while images are left to decode, all of
    them once decoding is over.

    An OpenMP team is only as fast as its slowest thread: with two threads on two cores and a
    decoder taking turns on one of them, every parallel region waits for the thread that
    lost its core. Used by `loader.image_batches(share_cores=True)`, which no command turns
    on yet: on the shared 2-core machine it was not measurably faster (bench/README.md,
    "Third round").
    """
    return all_threads if decoding_left == 0 else max(1, all_threads - workers)


def check_batch_size(value: Any) -> int:
    """--batch-size, the same limits and words in every command."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH:
        raise OptionError(
            f"--batch-size must be a whole number from 1 to {MAX_BATCH}, got {value!r}"
        )
    return value


def check_workers(value: Any, what: str = "--workers") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise OptionError(f"{what} must be a whole number from 0 to {MAX_WORKERS}, got {value!r}")
    return value


def check_device(name: Any) -> str:
    """--device by its form (auto, cpu, cuda, cuda:N, mps); `resolve_device` checks it is here."""
    text = str(name).strip().lower()
    if text not in ("auto", "cpu", "cuda", "mps") and not (
        text.startswith("cuda:") and text[5:].isdigit()
    ):
        raise OptionError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")
    return text


def check_dtype(name: Any) -> str:
    if name not in DTYPE_CHOICES:
        raise OptionError(f"--dtype {name}: use one of {', '.join(DTYPE_CHOICES)}")
    return str(name)


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """The options every batch command shares (predict, embed, eval, attention, score,
    inspect), validated once, here, with one set of limits and words. A command's options
    class extends it; a default may differ per command ("auto" batch size, None workers: the
    command resolves them)."""

    model: str | None = None  # a file, folder or hub id; None is the bundled model
    batch_size: Any = 32  # images per forward pass, 1 to MAX_BATCH
    workers: Any = field(default_factory=default_workers)  # decoding processes; 0: in-process
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16 (commands without --dtype: auto)

    def __post_init__(self) -> None:
        if self.batch_size != "auto":
            check_batch_size(self.batch_size)
        if self.workers is not None:
            check_workers(self.workers)
        check_device(self.device)
        check_dtype(self.dtype)


def render_threads() -> int:
    """Threads for drawing and encoding pictures beside the model: half the CPUs, 1 to 4."""
    return max(1, min(4, cpu_count() // 2))


def prefer_passive_waiting() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy or torch is already loaded
    (OpenMP reads it once, at load). Returns whether it was set.

    Commands that decode images in worker processes while the model runs on the same CPU call
    this before importing torch: with OpenMP's default (active) waiting, a thread that reaches
    a barrier first spins, and when a decoder has pre-empted its partner the spinning burns the
    very core the partner needs. Passive waiting gives the core back (bench/wait_policy.py).

    Also THP_MEM_ALLOC_ENABLE=1 unless the user set it (torch reads it once, too): large
    tensors on transparent huge pages fault in 512x fewer pages, and page faults are much of a
    batch's time on some VMs (docs/int8.md: B/16 int8 11-30% faster, fp32 2-11%).

    And on glibc, freed memory is kept for the next batch (`keep_freed_memory`).
    """
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keep_freed_memory()
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


# glibc's mallopt parameters (malloc.h) and the values set: every block under 32 MB (glibc's
# ceiling for the threshold) comes from the heap, and up to 1 GB free at its top stays there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREE_BYTES, _HEAP_BLOCK_BYTES = 1 << 30, 32 << 20


def keep_freed_memory() -> bool:
    """Have glibc keep memory a forward pass freed for the next one, instead of handing it
    back to the kernel and faulting it in again. Returns whether it was set.

    Each layer of a forward pass allocates activations of megabytes and frees them a moment
    later. glibc's defaults serve such blocks with mmap, or from the heap but trim its top as
    soon as it is free, so the next batch faults every page in again, zeroed by the kernel:
    measured on a Ti/16 at batch 32, 113,000 page faults in every batch (about 440 MB), and
    0.75-1.1 s per batch against 0.62-0.85 s with these settings, which leave none after
    the first (the peak resident size stayed within 5%). Left alone where the user set
    glibc's own MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_, and off glibc.
    """
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        kept = libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES)
        heap = libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_BYTES)
    except (OSError, AttributeError):
        return False
    return bool(kept and heap)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA, else Apple MPS, else CPU. `cuda` under torchrun takes the LOCAL_RANK GPU;
    `cuda:N` takes GPU N."""
    import torch

    from . import distributed

    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise InputError(
                "--device mps: Apple MPS is not available here; use --device cpu or auto"
            )
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: no CUDA GPU is available to this torch build; "
                "use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if name == "cuda":
            return torch.device("cuda", distributed.local_rank() % count)
        index_text = name.partition(":")[2]
        if not index_text.isdigit() or int(index_text) >= count:
            raise InputError(
                f"--device {name}: no such GPU; this machine has cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", int(index_text))
    raise OptionError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN reports native bf16 (AVX512-BF16 / AMX); AVX2 machines emulate it slowly."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_capability() -> str:
    """torch's name for the vector instructions it uses here: AVX512, AVX2, DEFAULT, ..."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """(dtype, warning or None). auto never picks a dtype the hardware runs slowly: float32 on
    CPU and MPS, bfloat16 on CUDA GPUs that support it, float16 on older GPUs. bfloat16 on a
    CPU needs native bf16 (runtime detection): asked for on one without, it is refused."""
    import torch

    check_dtype(name)
    if name == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, None
            major, _ = torch.cuda.get_device_capability(device)
            return (torch.float16 if major >= 7 else torch.float32), None
        return torch.float32, None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    warning = None
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        # Emulated, bf16 runs at under 1 GFLOP/s: a B/16 would take minutes per image.
        raise InputError(
            f"--dtype bfloat16: this CPU ({cpu_capability()}) has no native bf16 "
            "(AVX512-BF16 or AMX) and would run many times slower than float32; "
            "drop --dtype, or use a CPU or GPU with bf16"
        )
    if device.type == "cpu" and dtype == torch.float16:
        warning = (
            "float16 on a CPU is emulated and runs far slower than float32; "
            "drop --dtype or use float32"
        )
    return dtype, warning


def die_with_parent(parent: int) -> None:
    """In a worker process: have Linux SIGKILL it when the process that started it dies, so a
    `vit` killed with SIGKILL or SIGTERM leaves no orphaned workers. `parent` is the starter's
    pid, checked after the request in case it died first. A no-op outside Linux."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)
