"""The machinery `vit predict` and `vit embed` share: images decoded in worker processes,
one model call per batch, records released in input order, torchrun sharding.

`model_batches` turns input items into per-batch [(position, record)] lists through a
`compute` function (normalised pixels -> one result per image). `OrderedRun` streams those
records in input order alone or under torchrun: rank r computes positions r, r + W, ...;
after each batch rank 0 gathers every rank's records (gloo object collectives) and releases
the longest complete prefix, so it buffers about W x B records at most.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import distributed
from ..data.decoders import EarlyDecoding
from ..data.inputs import InputItem
from ..data.loader import image_batches
from ..data.preprocess import Preprocess
from ..errors import InputError, VitError

# on_progress(done, total): images finished so far (all ranks) out of all inputs.
ProgressCallback = Callable[[int, int], None]
# compute(inputs (B, C, H, W)) -> per image, the record's fields or an error message.
Compute = Callable[[torch.Tensor], list[dict | str]]
Batches = Callable[[Sequence[InputItem]], Iterator[list[tuple[int, dict]]]]


@dataclass
class Summary:
    total: int = 0
    failed: int = 0
    seconds: float = 0.0
    world_size: int = 1

    @property
    def succeeded(self) -> int:
        return self.total - self.failed


@dataclass(frozen=True)
class LoaderOptions:
    """How images reach the model: batch size, decoding processes, device and dtype."""

    batch_size: int
    workers: int
    fast_decode: bool  # JPEG draft decoding (opt-in)
    device: torch.device
    dtype: torch.dtype
    # Images decoding since before the model was loaded (services/early.py), taken over when
    # they are the ones asked for.
    early: EarlyDecoding | None = None


def model_batches(
    items: Sequence[InputItem],
    preprocess: Preprocess,
    loader: LoaderOptions,
    compute: Compute,
) -> Iterator[list[tuple[int, dict]]]:
    """Per batch, [(position in `items`, record)] in order; batch k covers positions
    [kB, (k+1)B). A record is {"path", **fields} or {"path", "error"}."""
    if not items:
        return
    batch_size = loader.batch_size
    batches = image_batches(
        [item.path for item in items],
        preprocess,
        batch_size=batch_size,
        workers=loader.workers,
        draft=loader.fast_decode,
        pin_memory=loader.device.type == "cuda",
        errors=[item.error for item in items],
        device=loader.device,
        dtype=loader.dtype,
        early=loader.early,
    )
    for batch in batches:
        records: dict[int, dict] = {}
        for index, message in batch.failures:
            records[index] = {"path": items[index].path, "error": message}
        if batch.indices:
            assert batch.inputs is not None
            for index, result in zip(batch.indices, compute(batch.inputs)):
                path = items[index].path
                records[index] = (
                    {"path": path, "error": f"{path}: {result}"}
                    if isinstance(result, str)
                    else {"path": path, **result}
                )
        yield sorted(records.items())


def share_inputs(collect: Callable[[], list[InputItem]]) -> list[InputItem]:
    """The input list, collected once on rank 0 (stdin is only rank 0's) and sent to every rank.

    A user error on rank 0 is re-raised on every rank so that none waits forever.
    """
    if not distributed.is_distributed():
        return collect()
    if distributed.is_main():
        payload: tuple[str, list[InputItem] | str]
        try:
            payload = ("ok", collect())
        except VitError as error:
            payload = ("error", str(error))
        payload = distributed.broadcast_object(payload)
    else:
        payload = distributed.broadcast_object(None)
    status, value = payload
    if isinstance(value, str) or status == "error":
        raise InputError(str(value))
    return value


class OrderedRun:
    """One run over `items`; iterate `records()` for batches of records in input order.

    Alone it streams `batches(items)`. Distributed, every rank must iterate: rank r computes
    positions r, r + W, r + 2W, ... in batches; after each batch rank 0 gathers every rank's
    records (rank 0's shard is the longest, so all ranks agree on the number of rounds), and
    releases the longest prefix of input positions it now holds complete. After round k every
    position below W * (k + 1) * B is done, so rank 0 buffers at most about W * B records;
    other ranks yield nothing.
    """

    def __init__(
        self,
        items: Sequence[InputItem],
        batches: Batches,
        batch_size: int,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.items = list(items)
        self.batches = batches
        self.batch_size = batch_size
        self.on_progress = on_progress
        self.summary = Summary(total=len(self.items), world_size=distributed.world_size())

    def records(self) -> Iterator[list[dict]]:
        start = time.perf_counter()
        done = 0
        if self.on_progress:
            self.on_progress(0, len(self.items))
        stream = self._local() if not distributed.is_distributed() else self._distributed()
        for records in stream:
            self.summary.failed += sum(1 for record in records if "error" in record)
            done += len(records)
            self.summary.seconds = time.perf_counter() - start
            if self.on_progress:
                self.on_progress(done, len(self.items))
            yield records
        if distributed.is_distributed():
            # Every rank learns the outcome so that all exit with the same status.
            self.summary.failed = distributed.broadcast_object(self.summary.failed)
        self.summary.seconds = time.perf_counter() - start

    def _local(self) -> Iterator[list[dict]]:
        for batch in self.batches(self.items):
            yield [record for _, record in batch]

    def _distributed(self) -> Iterator[list[dict]]:
        world, me = distributed.world_size(), distributed.rank()
        positions = distributed.shard(len(self.items), me, world)
        rounds = math.ceil(len(distributed.shard(len(self.items), 0, world)) / self.batch_size)
        local = self.batches([self.items[p] for p in positions])
        pending: dict[int, dict] = {}
        next_position = 0
        for _ in range(rounds):
            batch = next(local, [])
            mine = [(positions[index], record) for index, record in batch]
            gathered = distributed.gather_object(mine)
            if gathered is None:  # not rank 0: rank 0 writes everything
                continue
            for part in gathered:
                pending.update(part)
            released = []
            while next_position in pending:
                released.append(pending.pop(next_position))
                next_position += 1
            if released:
                yield released
        if me == 0 and (pending or next_position != len(self.items)):
            raise RuntimeError(
                f"distributed run lost records: {next_position} of {len(self.items)} released"
            )


class Sink(Protocol):
    """Where a batch command's records go: a file writer, the CLI's table, an array file."""

    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def drain(batches: Iterable[list[dict]], sink: Sink | None) -> None:
    """Write every batch of records to `sink` (None on ranks other than 0, which only compute),
    then close it (json's closing bracket, an atomic rename); on any failure or interrupt the
    sink is aborted instead, so no half file is left behind."""
    try:
        for records in batches:
            if sink is not None:
                sink.write(records)
        if sink is not None:
            sink.close()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
