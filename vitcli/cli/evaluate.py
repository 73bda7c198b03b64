"""`vit eval`: parse the options, call services.evaluate.run, render the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    BatchSizeOption,
    DeviceOption,
    DType,
    DTypeOption,
    FastDecodeOption,
    Int8Option,
    JobsAlias,
    ModelOption,
    WorkersOption,
)


def evaluate(
    data: Annotated[
        Path,
        typer.Argument(
            help="Folder with one subfolder of images per class, named after the model's labels.",
            show_default=False,
        ),
    ],
    model: ModelOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            dir_okay=False,
            metavar="FILE",
            help="Write the results to FILE.json or FILE.csv.",
        ),
    ] = None,
    confusion_png: Annotated[
        Path | None,
        typer.Option(
            "--confusion-png",
            dir_okay=False,
            metavar="FILE",
            help="Save the confusion matrix as a PNG heat map.",
        ),
    ] = None,
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = None,
    jobs: JobsAlias = None,
    device: DeviceOption = "auto",
    dtype: DTypeOption = DType.auto,
    int8: Int8Option = False,
    fast_decode: FastDecodeOption = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            metavar="",
            help="No progress bar and no tables: the top-1/top-5 line only (and any errors).",
        ),
    ] = False,
) -> None:
    """Evaluate a model on a labelled image folder: top-1, top-5, per-class accuracy, confusion.

    Exit status 1 when any image could not be decoded (the others are still evaluated and the \
files still written); a class none of whose images decoded has no accuracy and is an error.
    """
    from ..console import err, make_progress, print_error, print_note, print_warning
    from ..console import out as stdout
    from ..services.evaluate import EvalOptions, run

    options = EvalOptions(
        data=str(data),
        model=model,
        output=str(output) if output is not None else "",
        confusion_png=str(confusion_png) if confusion_png is not None else "",
        batch_size=batch_size,
        workers=workers if workers is not None else jobs,
        device=device,
        dtype=dtype.value,
        int8=int8,
        fast_decode=fast_decode,
    )
    with make_progress(quiet=quiet) as progress:
        task = progress.add_task("eval", total=None, rate="")

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = run(
            options,
            on_progress=on_progress,
            on_note=None if quiet else print_note,
            on_warning=print_warning,
        )
    summary = (
        f"top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  "
        f"({result.images} images, {len(result.classes)} classes"
        + (", fast decode)" if result.decode == "fast" else ")")
    )
    if quiet:
        stdout.print(summary, markup=False)
    else:
        _render(result, stdout)
    for path in result.written:
        err.print(f"wrote {_shown(str(path))}", soft_wrap=True)
    failed = False
    for label in result.failed_classes:
        print_error(f"class {label}: none of its images could be decoded; it has no accuracy")
        failed = True
    if result.failures:
        print_error(
            f"{len(result.failures)} images could not be decoded and were left out "
            "(each is named above and in the report's failures)"
        )
        failed = True
    if failed:
        raise typer.Exit(1)


def _shown(text: str) -> str:
    """Text for the terminal (a label, a path): control characters such as ESC and bytes that
    are not UTF-8 as visible escapes (text.terminal_safe), markup escaped."""
    from ..console import markup

    return markup(text)


def _render(result, console) -> None:
    from rich import box
    from rich.table import Table

    escape = _shown

    table = Table(title=escape(f"{result.model} on {result.data}"), box=box.SIMPLE_HEAD)
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    for c in result.classes:
        table.add_row(
            escape(c.label),
            str(c.images),
            str(c.failed),
            "-" if c.accuracy is None else f"{c.accuracy:.3f}",
            "-" if c.top5 is None else f"{c.top5:.3f}",
        )
    table.add_section()
    table.add_row(
        "[bold]all",
        str(result.images),
        str(len(result.failures)),
        f"[bold]{result.top1:.3f}",
        f"[bold]{result.top5:.3f}",
    )
    console.print(table)
    if len(result.confusion_labels) <= 16:
        matrix = Table(title="confusion (rows: true, columns: predicted)", box=box.SIMPLE_HEAD)
        matrix.add_column("")
        for name in result.confusion_labels:
            matrix.add_column(escape(name), justify="right")
        for row_index, (c, row) in enumerate(zip(result.classes, result.confusion)):
            matrix.add_row(
                escape(c.label),
                *(f"[bold]{v}" if i == row_index else str(v) for i, v in enumerate(row)),
            )
        console.print(matrix)


EXAMPLES = """\
[bold]Examples[/]

  vit eval shapes-test/
  vit eval photos/ --model runs/a/best.safetensors -o report.json --confusion-png c.png
  vit eval photos/ -o report.csv --workers 4 --device cuda:1
  vit eval photos/ --int8       [dim]# int8 on the CPU: compare its top-1 with float32's[/]
"""


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EXAMPLES)(evaluate)
