"""`vit predict`: classify images, files to folders of a hundred thousand."""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from pathlib import Path

import typer


class Format(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class _Table:
    """Streams records as a table: one small rich table per batch with the same fixed column
    widths, so the pieces line up as one table without holding every row."""

    def __init__(
        self, console, paths: list[str], labels: list[str], top_k: int, logits: bool
    ) -> None:
        self.console = console
        self.logits = logits
        width = max(console.width, 60)
        self.score_width = 8
        self.label_width = max(10, min(24, max((len(label) for label in labels), default=10)))
        longest = max((len(path) for path in paths), default=10)
        # Columns are separated by 2 spaces; the last one (next guesses, or the error) takes what is left.
        room = width - self.label_width - self.score_width - 12
        self.path_width = max(12, min(longest, room - 24, room // 2))
        self.rest_width = max(10, room - self.path_width)
        self.first = True

    def _score(self, score: float) -> str:
        return f"{score:.3f}" if self.logits else f"{score * 100:.1f}%"

    def write(self, records: list[dict]) -> None:
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        table = Table(
            box=box.SIMPLE_HEAD,
            show_header=self.first,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1),
        )
        table.add_column("image", width=self.path_width, overflow="fold")
        table.add_column("prediction", width=self.label_width, overflow="ellipsis", no_wrap=True)
        table.add_column(
            "logit" if self.logits else "score",
            width=self.score_width,
            justify="right",
            no_wrap=True,
        )
        table.add_column("next / error", width=self.rest_width, overflow="fold")
        for record in records:
            path = record["path"]
            if "error" in record:
                reason = record["error"].removeprefix(f"{path}: ")
                table.add_row(escape(path), "[red]failed[/]", "", f"[red]{escape(reason)}[/]")
                continue
            best, *rest = record["predictions"]
            others = ", ".join(f"{escape(p['label'])} {self._score(p['score'])}" for p in rest)
            table.add_row(
                escape(path),
                f"[bold]{escape(best['label'])}[/]",
                self._score(best["score"]),
                others,
            )
        self.console.print(table)
        self.first = False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def predict(
    inputs: list[str] = typer.Argument(
        ...,
        show_default=False,
        help="Image files, folders (searched recursively), quoted globs such as 'photos/**/*.jpg', or - to read paths from stdin.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model file, folder or hub id. \\[default: the bundled model]",
        show_default=False,
    ),
    format: Format | None = typer.Option(
        None,
        "--format",
        "-f",
        show_default=False,
        help="Output format. \\[default: table on a terminal, jsonl when piped, or from the --output suffix]",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Write results to this file instead of stdout (json/csv atomically, jsonl streamed).",
    ),
    top_k: int = typer.Option(
        5, "--top-k", "-k", min=1, help="Predictions per image (clipped to the number of classes)."
    ),
    logits: bool = typer.Option(
        False, "--logits", help="Raw scores instead of softmax probabilities."
    ),
    batch_size: int = typer.Option(
        32, "--batch-size", "-b", min=1, help="Images per forward pass."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        "-w",
        min=0,
        show_default=False,
        help="Decoding processes (0 decodes in the main process). \\[default: half the CPU cores, at least 1]",
    ),
    device: Device = typer.Option(
        Device.auto, "--device", help="auto picks cuda, then mps, then cpu."
    ),
    dtype: DType = typer.Option(
        DType.auto,
        "--dtype",
        help="auto: float32 on CPU/MPS, bfloat16 on CUDA (float16 on older GPUs).",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar and no summary unless something failed."
    ),
) -> None:
    """Classify images: one record per image, in input order.

    Exit status 0 when every image was classified, 1 when any failed (the others are still written).

    Under torchrun each rank classifies its own share and rank 0 writes all results.
    """
    from ..runtime import prefer_passive_waiting

    prefer_passive_waiting()  # before torch loads: decoders share the CPU with the model
    from rich.markup import escape

    from .. import distributed
    from ..console import err, make_progress, out, print_warning, stdout_is_terminal
    from ..data.inputs import collect_inputs
    from ..errors import InputError
    from ..services.outputs import format_for_path, open_writer
    from ..services.predict import PredictOptions, PredictRun, share_inputs
    from ..weights.resolve import load_model

    chosen = format.value if format is not None else None
    if chosen is None:
        chosen = (
            (format_for_path(output) or "jsonl")
            if output is not None
            else ("table" if stdout_is_terminal() else "jsonl")
        )
    if chosen == "table" and output is not None:
        raise InputError(
            "--format table is for the terminal; use --format json, jsonl or csv with --output"
        )

    distributed.init_from_env(backend="gloo")  # object collectives only: gloo whatever the device
    try:
        main = distributed.is_main()
        items = share_inputs(lambda: collect_inputs(inputs))
        bundle = load_model(model)
        options = PredictOptions(
            top_k=top_k,
            logits=logits,
            batch_size=batch_size,
            workers=workers,
            device=device.value,
            dtype=dtype.value,
        )
        show = main and not quiet
        progress = make_progress(quiet=not show)
        task = progress.add_task("predict", total=len(items), rate="")

        started = time.perf_counter()

        def on_progress(done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            rate = f"{done / elapsed:.1f} img/s" if elapsed > 0 and done else ""
            progress.update(task, completed=done, rate=rate)

        run = PredictRun(bundle, items, options, on_progress=on_progress if show else None)
        if run.warning and main:
            print_warning(run.warning)
        writer = None
        if main:
            if chosen == "table":
                writer = _Table(
                    out, [item.path for item in items], bundle.labels, run.predictor.top_k, logits
                )
            else:
                writer = open_writer(
                    chosen, path=output, stream=sys.stdout, top_k=run.predictor.top_k
                )
        try:
            with progress:
                for records in run.records():
                    if writer is not None:
                        writer.write(records)
        except BrokenPipeError:
            # The reader went away (`vit predict ... | head`): stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
        summary = run.summary
        if main and (summary.failed or not quiet):
            rate = summary.total / summary.seconds if summary.seconds > 0 else 0.0
            where = f"{run.predictor.device.type} {str(run.predictor.dtype).removeprefix('torch.')}"
            ranks = f" x {summary.world_size} ranks" if summary.world_size > 1 else ""
            failed = f", [red]{summary.failed} failed[/]" if summary.failed else ""
            target = f" -> {escape(str(output))}" if output is not None else ""
            err.print(
                f"{summary.succeeded} of {summary.total} images classified{failed} in {summary.seconds:.1f} s "
                f"({rate:.1f} img/s, {where}{ranks}){target}",
                highlight=False,
                soft_wrap=True,
            )
        # No rank may leave before rank 0 has written everything: a launcher such as torchrun
        # stops the whole group as soon as one rank exits with a failure status.
        distributed.barrier()
    finally:
        distributed.shutdown()
    if summary.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
