"""`vit predict`: classify images, files to folders of a hundred thousand.

The command parses options, shows progress and renders the table and the summary; the
service (services/predict.run) does the rest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..services.outputs import OutputFormat
from .common import (
    BatchSizeOption,
    Command,
    DeviceOption,
    DType,
    DTypeOption,
    FastDecodeOption,
    Int8Option,
    ModelOption,
    QuietOption,
    WorkersOption,
    batch_progress,
    batch_summary,
    whole_number,
)

EXAMPLES = """\
[bold]Examples[/]

  vit predict photo.jpg                     [dim]# a table on a terminal[/]
  vit predict photos/ -o results.csv        [dim]# a folder, recursively[/]
  vit predict 'photos/**/*.png' -f jsonl    [dim]# a quoted glob[/]
  find . -name '*.jpg' | vit predict - -q   [dim]# paths from stdin[/]
  vit predict photos/ -m google/vit-base-patch16-224 -k 3 --device cuda

Exit status: 0 when every image was classified, 1 when any failed (the others are still \
written) or the run could not start, 2 for a usage error. Guide: docs/predict.md.
"""


class _Table:
    """Streams records as a table: one small rich table per batch with the same fixed column
    widths, so the pieces line up as one table without holding every row. Every path, label
    and message goes through terminal_safe."""

    def __init__(self, console, paths: list[str], labels: list[str], logits: bool) -> None:
        import os

        from rich.console import Console

        from ..console import terminal_safe

        if not console.is_terminal and "COLUMNS" not in os.environ:
            # Piped, rich assumes 80 columns and would wrap every path; a wider fixed width
            # keeps one image per line for whoever reads the log.
            console = Console(file=console.file, width=120, highlight=False, soft_wrap=False)
        self.console = console
        self.logits = logits
        width = max(console.width, 60)
        self.score_width = 8
        shown_labels = [terminal_safe(label) for label in labels]
        self.label_width = max(10, min(24, max((len(label) for label in shown_labels), default=10)))
        longest = max((len(terminal_safe(path)) for path in paths), default=10)
        # Columns are separated by 2 spaces; the last (next guesses, or the error) takes the rest.
        room = width - self.label_width - self.score_width - 12
        self.path_width = max(12, min(longest, room - 24, room // 2))
        self.rest_width = max(10, room - self.path_width)
        self.first = True

    def _score(self, score: float) -> str:
        return f"{score:.3f}" if self.logits else f"{score * 100:.1f}%"

    def write(self, records: list[dict]) -> None:
        from rich import box
        from rich.table import Table

        from ..console import markup

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
                table.add_row(markup(path), "[red]failed[/]", "", f"[red]{markup(reason)}[/]")
                continue
            best, *rest = record["predictions"]
            others = ", ".join(f"{markup(p['label'])} {self._score(p['score'])}" for p in rest)
            table.add_row(
                markup(path),
                f"[bold]{markup(best['label'])}[/]",
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
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT",
            show_default=False,
            help="Image files, folders (searched recursively), quoted globs such as "
            "'photos/**/*.jpg', or - to read paths from stdin.",
        ),
    ],
    model: ModelOption = None,
    format: Annotated[
        OutputFormat | None,
        typer.Option(
            "--format",
            "-f",
            show_default=False,
            help="Output format. \\[default: table on a terminal, jsonl when piped, or from "
            "the --output suffix]",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            dir_okay=False,  # an existing folder is a usage error (exit 2), as in embed
            help="Write results to this file instead of stdout (json/csv atomically, jsonl "
            "streamed; a symlink is written through to its target).",
        ),
    ] = None,
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            "-k",
            metavar="K",
            parser=whole_number("--top-k", 1),
            help="Predictions per image, 1 or more (clipped to the number of classes).",
        ),
    ] = 5,
    logits: Annotated[
        bool,
        typer.Option(
            "--logits", metavar="", help="Raw scores (full precision) instead of probabilities."
        ),
    ] = False,
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    dtype: DTypeOption = DType.auto,
    int8: Int8Option = False,
    fast_decode: FastDecodeOption = False,
    quiet: QuietOption = False,
) -> None:
    """Classify images: one record per image, in input order.

    Exit status 0 when every image was classified, 1 when any failed (the others are \
written), 2 for a usage error.

    Under torchrun each rank classifies its own share and rank 0 writes all results.
    """
    from ..runtime import resolve_workers
    from ..services.early import early_start

    worker_count, clamped = resolve_workers(workers)
    # Inputs collected and images decoding from now on, while torch is imported (early.py).
    with early_start(
        model, inputs, batch_size=batch_size, workers=worker_count, fast_decode=fast_decode
    ) as early:
        from .. import distributed
        from ..console import (
            markup,
            print_line,
            print_note,
            print_warning,
            rows_console,
            stdout_is_terminal,
        )
        from ..services import predict as service
        from ..services.outputs import choose_format

        chosen = choose_format(
            format.value if format is not None else None, output, stdout_is_terminal()
        )
        options = service.PredictOptions(
            top_k=top_k,
            logits=logits,
            batch_size=batch_size,
            workers=worker_count,
            device=device,
            dtype=dtype.value,
            int8=int8,
            fast_decode=fast_decode,
            inputs=tuple(inputs),
            model=model,
            format=chosen,
            output=output,
        )
        main = distributed.is_main()
        if clamped and main:
            print_warning(clamped)
        show = main and not quiet
        progress, on_progress = batch_progress("predict", show)

        def table(paths: list[str], labels: list[str], top_k: int) -> service.RecordSink:
            return _Table(rows_console(progress), paths, labels, logits)

        try:
            # The service writes everything, json's closing bracket included, while the bar is
            # live: output lands above the bar, never after it.
            with progress:
                result = service.run(
                    options,
                    on_progress if show else None,
                    on_warning=print_warning,
                    on_note=print_note if show else None,
                    table=table,
                    early=early,
                )
        except BrokenPipeError:
            # The reader went away (`vit predict ... | head`): stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        summary = result.summary
        if result.is_main and (summary.failed or not quiet):
            target = f" -> {markup(str(result.output))}" if result.output is not None else ""
            line = batch_summary(
                summary, "classified", result.device, target, by=f" by {markup(result.model)}"
            )
            print_line(line)
        # Under torchrun any non-zero exit makes the launcher stop the other ranks and print its
        # own ChildFailedError traceback; images that failed are in the records and the summary,
        # so a distributed run that completed exits 0 on every rank (docs/predict.md).
        if summary.failed and summary.world_size == 1:
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("predict", cls=Command, epilog=EXAMPLES)(predict)
