"""`vit score`: which explanation method is right, measured on a shapes folder with masks."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    BatchSizeOption,
    DeviceOption,
    ModelOption,
    QuietOption,
    WorkersOption,
    number,
    whole_number,
)


class Baseline(str, Enum):
    mean = "mean"
    blur = "blur"


def score(
    data: Annotated[
        Path, typer.Argument(help="A `vit data shapes` folder (one or two objects per image).")
    ],
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            metavar="METHOD",
            help="raw, rollout, gae, attribution, gradcam (repeatable or comma list). "
            "\\[default: all]",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            dir_okay=False,
            help="Also write the scores as JSON to this file.",
        ),
    ] = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            metavar="N",
            parser=whole_number("--steps", 1, 1000),
            help="Deletion/insertion steps, 1 to 1000.",
        ),
    ] = 10,
    baseline: Annotated[
        Baseline, typer.Option("--baseline", help="What removed patches show.")
    ] = Baseline.mean,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            metavar="PIXELS",
            parser=number("--tolerance", 0.0),
            help="Pointing game tolerance, 0 or more.",
        ),
    ] = 15.0,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            metavar="N",
            parser=whole_number("--limit", 1),
            show_default=False,
            help="Score the first N images only (1 or more). \\[default: all]",
        ),
    ] = None,
    batch_size: BatchSizeOption = 8,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Score explanation methods against the object masks of a shapes folder.

    Per method: pointing game on the target's object and on the other object, mass on each \
vs its area share, deletion and insertion AUC, and ms per map; a random map is the \
control. Generate data with `vit data shapes DIR --objects 2`. Guide: docs/explain.md.
    """
    from ..console import err, make_progress
    from ..errors import InputError
    from ..explain import METHODS, parse_methods
    from ..fileio import write_output
    from ..runtime import resolve_workers
    from ..services.scoring import (
        ScoreOptions,
        markdown_table,
        score_explanations,
        shapes_objects,
    )
    from ..text import json_bytes

    workers_used, warning = resolve_workers(workers)
    options = ScoreOptions(  # usage errors first, before any file is looked at
        methods=parse_methods(method) or tuple(METHODS),
        tolerance=tolerance,
        steps=steps,
        baseline=baseline.value,
        batch_size=batch_size,
        workers=workers_used,
        device=device,
    )
    if not data.is_dir():
        raise InputError(f"{data}: not a folder; generate one with `vit data shapes {data}`")
    images, _ = shapes_objects(data)
    total = min(len(images), limit) if limit else len(images)
    if warning and not quiet:
        err.print(warning)
    with make_progress(quiet=quiet) as progress:
        task = progress.add_task("score", total=total, rate="")
        report = score_explanations(
            model,
            data,
            options,
            limit=limit,
            on_progress=lambda done, _: progress.update(task, completed=done),
        )
    summary = report.to_dict()
    if output is not None:
        write_output(output, json_bytes(summary))
    # Markdown, not a rich table: eleven columns do not fit a terminal, and the same text
    # pastes into docs and issues.
    typer.echo(markdown_table(summary["methods"]))
    if not quiet:
        err.print(
            f"{report.images} images scored ({len(report.failures)} failed); pointing within "
            f"{tolerance:g} px; AUC over {steps} steps, {baseline.value} baseline"
        )


EXAMPLES = """\
[bold]Examples[/]

  vit data shapes pairs/ --objects 2 --per-class 20   [dim]# a folder with two objects each[/]
  vit score pairs/                                    [dim]# every method, a markdown table[/]
  vit score pairs/ --method rollout,gae --limit 50 -o scores.json
"""


def register(app: typer.Typer) -> None:
    app.command("score", epilog=EXAMPLES)(score)
