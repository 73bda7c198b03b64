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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .. import distributed
from ..data.decoders import EarlyDecoding
from ..data.images import pixel_limit
from ..data.inputs import InputItem, collect_inputs, refuse_output_among_inputs
from ..errors import OptionError, VitError
from ..runtime import BatchOptions, resolve_device, resolve_dtype
from ..weights.format import ModelBundle
from .batchrun import (
    LoaderOptions,
    OrderedRun,
    ProgressCallback,
    Sink,
    Summary,
    drain,
    model_batches,
    share_inputs,
)
from .early import EarlyStart
from .int8 import prepare_int8, runs_on
from .outputs import OutputFormat, open_writer

__all__ = [
    "PredictOptions",
    "PredictResult",
    "PredictRun",
    "Predictor",
    "ProgressCallback",
    "Summary",
    "predict_paths",
    "run",
    "share_inputs",
]

SCORE_DIGITS = 6  # significant digits of probabilities in records


@dataclass(frozen=True)
class PredictOptions(BatchOptions):
    """Everything `vit predict` was asked, defaults resolved, beside the shared BatchOptions.
    The first group is what a `PredictRun` needs; the second is what `run` adds (inputs,
    where records go)."""

    top_k: int = 5
    logits: bool = False  # raw scores instead of softmax probabilities
    # Opt-in JPEG draft decoding (--fast-decode): faster, and not the home library's pixels.
    fast_decode: bool = False
    int8: bool = False  # int8 Linear layers, CPU only (services/int8.py)

    inputs: tuple[str, ...] = ()  # files, folders, globs, '-' for stdin
    format: OutputFormat = OutputFormat.jsonl
    output: Path | None = None  # None writes to stdout

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise OptionError(f"--top-k must be at least 1, got {self.top_k}")
        if self.format == OutputFormat.table and self.output is not None:
            raise OptionError(
                "--format table is for the terminal; use --format json, jsonl or csv with --output"
            )


@dataclass(frozen=True)
class PredictResult:
    """What a `run` did; `is_main` is False on the ranks other than 0, which wrote nothing."""

    summary: Summary
    device: str  # e.g. "cpu float32"
    top_k: int
    model: str  # ModelBundle.describe(): the name, and what the bundled model knows
    output: Path | None
    is_main: bool


RecordSink = Sink  # where records go: a file writer, or the CLI's table


# table(paths, labels, top_k) -> the sink that draws the table (the CLI's; needs rich).
TableFactory = Callable[[list[str], list[str], int], RecordSink]


# -- the predictor -----------------------------------------------------------------------


class Predictor:
    """A model on a device, turning pixel batches into top-k predictions."""

    def __init__(
        self,
        bundle: ModelBundle,
        options: PredictOptions,
        on_note: Callable[[str], None] | None = None,
        early: EarlyDecoding | None = None,
    ) -> None:
        num_classes = bundle.config.num_classes
        if num_classes < 1 or bundle.config.head_kind == "projection":
            raise VitError(
                f"{bundle.reference or 'the model'} has no classifier (an embedding model); "
                "use `vit embed`, `vit attention`, or `vit train --linear-probe`"
            )
        self.bundle = bundle
        self.options = options
        self.early = early
        self.labels = list(bundle.labels)
        self.top_k = min(options.top_k, num_classes)  # clipped to the number of classes
        # The one int8 decision of the run (`on_note`: a first --int8 run builds its graph,
        # and the user hears why it takes a while).
        self.device = resolve_device(
            prepare_int8(bundle, options.int8, options.device, options.dtype, "predict", on_note)
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
        loader = LoaderOptions(
            batch_size=self.options.batch_size,
            workers=self.options.workers,
            fast_decode=self.options.fast_decode,
            device=self.device,
            dtype=self.dtype,
            early=self.early,
        )

        # Records say when they came from draft-decoded pixels (jsonl/json keys, a csv column).
        marks = {"decode": "fast"} if self.options.fast_decode else {}

        def compute(inputs: torch.Tensor) -> list[dict | str]:
            return [
                result if isinstance(result, str) else {"predictions": result, **marks}
                for result in self.classify(inputs)
            ]

        return model_batches(items, self.bundle.preprocess, loader, compute)


def _not_finite(bundle: ModelBundle) -> str:
    return (
        f"model output is not finite (NaN or infinity); {bundle.reference or 'the model'} "
        "has broken weights or preprocessing values (std 0?)"
    )


class PredictRun(OrderedRun):
    """One run over `items`; iterate `records()` for batches of records in input order
    (alone, or under torchrun with rank 0 releasing them in order: batchrun.OrderedRun)."""

    def __init__(
        self,
        bundle: ModelBundle,
        items: Sequence[InputItem],
        options: PredictOptions | None = None,
        on_progress: ProgressCallback | None = None,
        on_note: Callable[[str], None] | None = None,
        early: EarlyDecoding | None = None,
    ) -> None:
        self.options = options if options is not None else PredictOptions()
        self.predictor = Predictor(bundle, self.options, on_note, early)
        super().__init__(items, self.predictor.batches, self.options.batch_size, on_progress)

    @property
    def warning(self) -> str | None:
        return self.predictor.warning


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
    on_note: Callable[[str], None] | None = None,
    table: TableFactory | None = None,
    stdin: Iterable[str] | None = None,
    stdout: TextIO | None = None,
    early: EarlyStart | None = None,
) -> PredictResult:
    """`vit predict`: classify `options.inputs` and write every record, in input order, to
    `options.output` (or `stdout`, or the `table` sink for the table format).

    Under torchrun, every rank calls this: inputs are collected on rank 0 and shared, each
    rank classifies its shard, rank 0 writes, and no rank returns before rank 0 has written
    everything (a launcher stops the whole group as soon as one rank exits with a failure).
    Progress and warnings are reported on rank 0 only. `early`: the inputs as collected, and
    their images decoding, before torch was imported (services/early.py).
    """
    import sys

    from ..weights.resolve import load_model

    pixel_limit()  # a bad VITCLI_MAX_PIXELS is one error now, not one per image
    if options.format == OutputFormat.table and table is None:
        raise OptionError("the table format needs a terminal renderer; use json, jsonl or csv")

    def collect() -> list[InputItem]:
        items = early.items if early is not None else collect_inputs(options.inputs, stdin)
        if options.output is not None:
            refuse_output_among_inputs(options.output, items, "--output")
        return items

    distributed.init_from_env(backend="gloo")  # object collectives only: gloo whatever the device
    try:
        main = distributed.is_main()
        items = share_inputs(collect)
        bundle = load_model(options.model)
        predict = PredictRun(
            bundle,
            items,
            options,
            on_progress if main else None,
            on_note=on_note if main else None,
            early=early.decoding if early is not None else None,
        )
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
                    decode_column=options.fast_decode,
                )
        drain(predict.records(), sink)
        distributed.barrier()
    finally:
        if early is not None:
            early.close()
        distributed.shutdown()
    return PredictResult(
        summary=predict.summary,
        device=runs_on(predict.predictor.model, predict.predictor.device, predict.predictor.dtype)
        + (", fast decode" if options.fast_decode else ""),
        top_k=top_k,
        model=predict.predictor.bundle.describe(),
        output=options.output,
        is_main=main,
    )
