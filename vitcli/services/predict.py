"""Classify many images: stream batches decoded in worker processes through the model.

Records come out in input order, batch by batch, so a caller can write them as they arrive:
memory stays flat however many images there are (only a few batches are ever alive). Under
torchrun each rank classifies a disjoint, strided shard; after every batch the ranks send
their records to rank 0 (gloo object collectives), which puts them back in input order.

A record is {"path": ..., "predictions": [{"label", "index", "score"}, ...]} or
{"path": ..., "error": "..."}.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import distributed
from ..data.inputs import InputItem
from ..data.loader import image_batches, normalize
from ..errors import InputError, VitError
from ..runtime import default_workers, resolve_device, resolve_dtype
from ..weights.format import ModelBundle

# on_progress(done, total): images finished so far (all ranks) out of all inputs.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PredictOptions:
    top_k: int = 5
    logits: bool = False  # raw scores instead of softmax probabilities
    batch_size: int = 32
    workers: int | None = None  # decoding processes; None picks for this machine
    device: str = "auto"
    dtype: str = "auto"
    draft: bool = True  # JPEG draft-mode decoding of large sources


@dataclass
class Summary:
    total: int = 0
    failed: int = 0
    seconds: float = 0.0
    world_size: int = 1

    @property
    def succeeded(self) -> int:
        return self.total - self.failed


# -- the predictor -----------------------------------------------------------------------


class Predictor:
    """A model on a device, turning pixel batches into top-k predictions."""

    def __init__(self, bundle: ModelBundle, options: PredictOptions) -> None:
        if options.top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {options.top_k}")
        if options.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
        if options.workers is not None and options.workers < 0:
            raise InputError(f"--workers must be 0 or more, got {options.workers}")
        num_classes = bundle.config.num_classes
        if num_classes < 1:
            raise VitError(
                f"{bundle.reference or 'the model'} has no classifier head (num_classes 0); use a classification model"
            )
        self.bundle = bundle
        self.options = options
        self.labels = list(bundle.labels)
        self.top_k = min(options.top_k, num_classes)  # clipped to the number of classes
        self.device = resolve_device(options.device)
        self.dtype, self.warning = resolve_dtype(options.dtype, self.device)
        self.model = bundle.model.eval().to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def classify(self, pixels: torch.Tensor) -> list[list[dict]]:
        """(B, C, H, W) pixels -> per image, the top-k [{"label", "index", "score"}].

        uint8 pixels (as the loader makes them) are normalised here, on the device; float
        pixels are taken as already normalised.
        """
        if pixels.dtype == torch.uint8:
            x = normalize(pixels, self.bundle.preprocess, self.device, self.dtype)
        else:
            x = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        scores = self.model(x).float()  # B,K; softmax in float32 whatever the model dtype
        if not self.options.logits:
            scores = scores.softmax(dim=-1)
        top = scores.topk(self.top_k, dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [
            [
                {"label": self.labels[i], "index": i, "score": s}
                for s, i in zip(row_scores, row_indices)
            ]
            for row_scores, row_indices in zip(values, indices)
        ]

    def batches(
        self, items: Sequence[InputItem], workers: int | None = None
    ) -> Iterator[list[tuple[int, dict]]]:
        """Per batch, [(position in `items`, record)] in order; batch k covers items [kB, (k+1)B)."""
        if not items:
            return
        batch_size = self.options.batch_size
        workers = default_workers() if workers is None else workers
        # Worker start-up is pure cost when there is nothing to overlap with.
        workers = min(workers, math.ceil(len(items) / batch_size) - 1)
        loader = image_batches(
            [item.path for item in items],
            self.bundle.preprocess,
            batch_size=batch_size,
            workers=max(workers, 0),
            draft=self.options.draft,
            pin_memory=self.device.type == "cuda",
            errors=[item.error for item in items],
        )
        for batch in loader:
            records: dict[int, dict] = {}
            for index, message in batch.failures:
                records[index] = {"path": items[index].path, "error": message}
            if batch.indices:
                for index, predictions in zip(batch.indices, self.classify(batch.pixels)):
                    records[index] = {"path": items[index].path, "predictions": predictions}
            yield sorted(records.items())


def share_inputs(collect: Callable[[], list[InputItem]]) -> list[InputItem]:
    """The input list, collected once on rank 0 (stdin is only rank 0's) and sent to every rank.

    A user error on rank 0 is re-raised on every rank so that none waits forever.
    """
    if not distributed.is_distributed():
        return collect()
    if distributed.is_main():
        try:
            payload = ("ok", collect())
        except VitError as error:
            payload = ("error", str(error))
        payload = distributed.broadcast_object(payload)
    else:
        payload = distributed.broadcast_object(None)
    status, value = payload
    if status == "error":
        raise InputError(value)
    return value


class PredictRun:
    """One run over `items`; iterate `records()` for batches of records in input order.

    Alone it streams the predictor's batches. Distributed, every rank must iterate: rank
    r classifies positions r, r + W, r + 2W, ... in batches; after each batch rank 0 gathers
    every rank's records (rank 0's shard is the longest, so all ranks agree on the number of
    rounds), and releases the longest prefix of input positions it now holds complete. After
    round k every position below W * (k + 1) * B is done, so rank 0 buffers at most about
    W * B records; other ranks yield nothing.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        items: Sequence[InputItem],
        options: PredictOptions = PredictOptions(),
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.items = list(items)
        self.options = options
        self.on_progress = on_progress
        self.predictor = Predictor(bundle, options)
        self.summary = Summary(total=len(self.items), world_size=distributed.world_size())

    @property
    def warning(self) -> str | None:
        return self.predictor.warning

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
        for batch in self.predictor.batches(self.items, workers=self.options.workers):
            yield [record for _, record in batch]

    def _distributed(self) -> Iterator[list[dict]]:
        world, me = distributed.world_size(), distributed.rank()
        positions = distributed.shard(len(self.items), me, world)
        rounds = math.ceil(
            len(distributed.shard(len(self.items), 0, world)) / self.options.batch_size
        )
        local = self.predictor.batches(
            [self.items[p] for p in positions], workers=self.options.workers
        )
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
                f"distributed predict lost records: {next_position} of {len(self.items)} released"
            )


def predict_paths(
    bundle: ModelBundle,
    items: Sequence[InputItem],
    options: PredictOptions = PredictOptions(),
    on_progress: ProgressCallback | None = None,
) -> Iterator[dict]:
    """Records one by one in input order (a convenience over PredictRun for library users)."""
    run = PredictRun(bundle, items, options, on_progress)
    for records in run.records():
        yield from records
