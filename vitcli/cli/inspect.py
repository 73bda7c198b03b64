"""`vit inspect`: the paper's Fig. 7 (embedding filters, position similarity, attention
distance) for any checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..runtime import MAX_BATCH
from ..services.attention.options import Colormap
from .common import DeviceOption, ModelOption, QuietOption


def inspect(
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the PNGs and numbers.")
    ],
    model: ModelOption = None,
    images: Annotated[
        str | None,
        typer.Option(
            "--images",
            metavar="DIR",
            show_default=False,
            help="Images to average the attention distance over (a folder, file or glob). "
            "\\[default: the checkout's examples/, else 12 generated shape images]",
        ),
    ] = None,
    max_images: Annotated[
        int,
        typer.Option(
            "--max-images",
            metavar="N",
            help="Use at most the first N, 1 or more (the paper: 128).",
        ),
    ] = 128,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            metavar="N",
            show_default=False,
            help=f"Images per forward pass, 1 to {MAX_BATCH}. "
            "\\[default: 16, fewer for large models]",
        ),
    ] = None,
    colormap: Annotated[
        Colormap, typer.Option("--colormap", help="Colormap of the similarity panel.")
    ] = Colormap.viridis,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Fig. 7 of the ViT paper for a checkpoint: what its filters, positions and heads learned.

    Writes into DIR:

      filters_pca.png: principal components of the patch-embedding filters
      position_similarity.png: cosine similarity of the position embeddings
      attention_distance.png: mean attention distance per head against depth
      inspect.json, inspect.safetensors: the numbers behind the pictures

    Guide: docs/inspect.md.
    """
    from ..console import err, make_progress, markup, print_warning
    from ..console import out as stdout
    from ..services.inspect import run_inspect

    with make_progress(quiet=quiet) as bar:
        task = bar.add_task("attention distance", total=None, rate="")

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = run_inspect(
            model,
            out,
            images,
            max_images=max_images,
            batch_size=batch_size,
            device=device,
            colormap=colormap.value,
            on_progress=advance,
        )
    for failed, message in summary.failures:
        print_warning(f"skipped {failed}: {message}")
    if quiet:
        return
    err.print(
        f"attention distance over {summary.used} images: {markup(summary.images.description)}"
    )
    for written in summary.files:
        stdout.print(markup(str(written)))


EXAMPLES = """\
[bold]Examples[/]

  vit inspect --out inspect/
  vit inspect --model google/vit-base-patch16-224 --images photos/ --out inspect-b16/
"""


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog=EXAMPLES)(inspect)
