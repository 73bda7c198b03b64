"""Classify many images: stream batches decoded in worker processes through the model.

`run(options, on_progress)` is the whole of `vit predict`: it collects the inputs, loads the
model, joins the torchrun process group when there is one, classifies, writes the records
and returns a summary. `PredictRun` is the loop underneath, for library use.

Records come out in input order, batch by batch, so a caller can write them as they arrive:
memory stays flat however many images there are (only a few batches are ever alive). Under
torchrun each rank classifies a disjoint, strided shard; after every batch the ranks send
their records to rank 0 (gloo object collectives), which puts them back in input order.

A record is {"path": ..., "predictions": [{"label", "index", "score"}, ...]} or
{"path": ..., "error": "..."}. Probabilities are rounded to 6 significant digits (more is
noise from the float32 forward pass); `logits` scores keep full float32 precision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

import torch

from .. import distributed
from ..data.images import pixel_limit
from ..data.inputs import InputItem, collect_inputs, refuse_output_among_inputs
from ..data.loader import image_batches
from ..errors import InputError, OptionError, VitError
from ..runtime import DTYPE_CHOICES, default_workers, resolve_device, resolve_dtype
from ..weights.format import ModelBundle
from .int8 import prepare_int8
from .outputs import OutputFormat, open_writer

# on_progress(done, total): images finished so far (all ranks) out of all inputs.
ProgressCallback = Callable[[int, int], None]

SCORE_DIGITS = 6  # significant digits of probabilities in records


@dataclass(frozen=True)
class PredictOptions:
    """Everything `vit predict` was asked, defaults resolved. The first group is what a
    `PredictRun` needs; the second is what `run` adds (inputs, model, where records go)."""

    top_k: int = 5
    logits: bool = False  # raw scores instead of softmax probabilities
    batch_size: int = 32
    workers: int = field(default_factory=default_workers)  # decoding processes; 0: in-process
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    draft: bool = True  # JPEG draft-mode decoding of large sources
    int8: bool = False  # int8 Linear layers, CPU only (services/int8.py)

    inputs: tuple[str, ...] = ()  # files, folders, globs, '-' for stdin
    model: str | None = None  # a file, folder or hub id; None is the bundled model
    format: OutputFormat = OutputFormat.jsonl
    output: Path | None = None  # None writes to stdout

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise OptionError(f"--top-k must be at least 1, got {self.top_k}")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise OptionError(f"--workers must be 0 or more, got {self.workers}")
        if self.dtype not in DTYPE_CHOICES:
            raise OptionError(f"--dtype {self.dtype}: use one of {', '.join(DTYPE_CHOICES)}")
        device = self.device.strip().lower()
        if device not in ("auto", "cpu", "cuda", "mps") and not (
            device.startswith("cuda:") and device[5:].isdigit()
        ):
            raise OptionError(f"--device {self.device}: use auto, cpu, cuda, cuda:N or mps")
        if self.format == OutputFormat.table and self.output is not None:
            raise OptionError(
                "--format table is for the terminal; use --format json, jsonl or csv with --output"
            )


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
class PredictResult:
    """What a `run` did; `is_main` is False on the ranks other than 0, which wrote nothing."""

    summary: Summary
    device: str  # e.g. "cpu float32"
    top_k: int
    output: Path | None
    is_main: bool


class RecordSink(Protocol):
    """Where records go: a file writer, or the CLI's table."""

    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


# table(paths, labels, top_k) -> the sink that draws the table (the CLI's; needs rich).
TableFactory = Callable[[list[str], list[str], int], RecordSink]


# -- the predictor -----------------------------------------------------------------------


class Predictor:
    """A model on a device, turning pixel batches into top-k predictions."""

    def __init__(self, bundle: ModelBundle, options: PredictOptions) -> None:
        num_classes = bundle.config.num_classes
        if num_classes < 1:
            raise VitError(
                f"{bundle.reference or 'the model'} has no classifier head (num_classes 0); "
                "use a classification model"
            )
        self.bundle = bundle
        self.options = options
        self.labels = list(bundle.labels)
        self.top_k = min(options.top_k, num_classes)  # clipped to the number of classes
        self.device = resolve_device(
            prepare_int8(bundle, options.int8, options.device, options.dtype)
        )
        self.dtype, self.warning = resolve_dtype(options.dtype, self.device)
        self.model = bundle.model.eval().to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def classify(self, inputs: torch.Tensor) -> list[list[dict] | str]:
        """(B, C, H, W) normalised model input -> per image, the top-k [{"label", "index",
        "score"}], or an error message when the model's output for it is not finite."""
        scores = self.model(inputs).float()  # B,K; softmax in float32 whatever the model dtype
        finite = torch.isfinite(scores).all(dim=-1).cpu().tolist()
        if not self.options.logits:
            scores = scores.softmax(dim=-1)
        top = scores.topk(self.top_k, dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        results: list[list[dict] | str] = []
        for ok, row_scores, row_indices in zip(finite, values, indices):
            if not ok:
                results.append(_not_finite(self.bundle))
                continue
            if not self.options.logits:
                row_scores = [float(f"{s:.{SCORE_DIGITS}g}") for s in row_scores]
            results.append(
                [
                    {"label": self.labels[i], "index": i, "score": s}
                    for s, i in zip(row_scores, row_indices)
                ]
            )
        return results

    def batches(self, items: Sequence[InputItem]) -> Iterator[list[tuple[int, dict]]]:
        """Per batch, [(position in `items`, record)] in order; batch k covers positions
        [kB, (k+1)B)."""
        if not items:
            return
        batch_size = self.options.batch_size
        # Worker start-up is pure cost when there is nothing to overlap with.
        workers = max(0, min(self.options.workers, math.ceil(len(items) / batch_size) - 1))
        loader = image_batches(
            [item.path for item in items],
            self.bundle.preprocess,
            batch_size=batch_size,
            workers=workers,
            draft=self.options.draft,
            pin_memory=self.device.type == "cuda",
            errors=[item.error for item in items],
            device=self.device,
            dtype=self.dtype,
        )
        for batch in loader:
            records: dict[int, dict] = {}
            for index, message in batch.failures:
                records[index] = {"path": items[index].path, "error": message}
            if batch.indices:
                assert batch.inputs is not None
                for index, result in zip(batch.indices, self.classify(batch.inputs)):
                    path = items[index].path
                    records[index] = (
                        {"path": path, "error": f"{path}: {result}"}
                        if isinstance(result, str)
                        else {"path": path, "predictions": result}
                    )
            yield sorted(records.items())


def _not_finite(bundle: ModelBundle) -> str:
    return (
        f"model output is not finite (NaN or infinity); {bundle.reference or 'the model'} "
        "has broken weights or preprocessing values (std 0?)"
    )


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
        options: PredictOptions | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.items = list(items)
        self.options = options if options is not None else PredictOptions()
        self.on_progress = on_progress
        self.predictor = Predictor(bundle, self.options)
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
        for batch in self.predictor.batches(self.items):
            yield [record for _, record in batch]

    def _distributed(self) -> Iterator[list[dict]]:
        world, me = distributed.world_size(), distributed.rank()
        positions = distributed.shard(len(self.items), me, world)
        rounds = math.ceil(
            len(distributed.shard(len(self.items), 0, world)) / self.options.batch_size
        )
        local = self.predictor.batches([self.items[p] for p in positions])
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
    options: PredictOptions | None = None,
    on_progress: ProgressCallback | None = None,
) -> Iterator[dict]:
    """Records one by one in input order (a convenience over PredictRun for library users)."""
    run_ = PredictRun(bundle, items, options, on_progress)
    for records in run_.records():
        yield from records


# -- the command -------------------------------------------------------------------------


def run(
    options: PredictOptions,
    on_progress: ProgressCallback | None = None,
    *,
    on_warning: Callable[[str], None] | None = None,
    table: TableFactory | None = None,
    stdin: Iterable[str] | None = None,
    stdout: TextIO | None = None,
) -> PredictResult:
    """`vit predict`: classify `options.inputs` and write every record, in input order, to
    `options.output` (or `stdout`, or the `table` sink for the table format).

    Under torchrun, every rank calls this: inputs are collected on rank 0 and shared, each
    rank classifies its shard, rank 0 writes, and no rank returns before rank 0 has written
    everything (a launcher stops the whole group as soon as one rank exits with a failure).
    Progress and warnings are reported on rank 0 only.
    """
    import sys

    from ..weights.resolve import load_model

    pixel_limit()  # a bad VITCLI_MAX_PIXELS is one error now, not one per image
    if options.format == OutputFormat.table and table is None:
        raise OptionError("the table format needs a terminal renderer; use json, jsonl or csv")

    def collect() -> list[InputItem]:
        items = collect_inputs(options.inputs, stdin)
        if options.output is not None:
            refuse_output_among_inputs(options.output, items, "--output")
        return items

    distributed.init_from_env(backend="gloo")  # object collectives only: gloo whatever the device
    try:
        main = distributed.is_main()
        items = share_inputs(collect)
        bundle = load_model(options.model)
        predict = PredictRun(bundle, items, options, on_progress if main else None)
        if predict.warning and main and on_warning is not None:
            on_warning(predict.warning)
        top_k = predict.predictor.top_k
        sink: RecordSink | None = None
        if main:
            if options.format == OutputFormat.table:
                assert table is not None
                sink = table([item.path for item in items], predict.predictor.labels, top_k)
            else:
                sink = open_writer(
                    options.format.value,
                    path=options.output,
                    stream=stdout if stdout is not None else sys.stdout,
                    top_k=top_k,
                )
        try:
            for records in predict.records():
                if sink is not None:
                    sink.write(records)
            if sink is not None:
                sink.close()  # json's closing bracket, the atomic rename
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        distributed.barrier()
    finally:
        distributed.shutdown()
    dtype = str(predict.predictor.dtype).removeprefix("torch.")
    return PredictResult(
        summary=predict.summary,
        device=f"{predict.predictor.device.type} {dtype}",
        top_k=top_k,
        output=options.output,
        is_main=main,
    )
