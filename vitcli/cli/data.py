"""`vit data ...`: dataset utilities."""

from __future__ import annotations

import os
from pathlib import Path

import typer

data_app = typer.Typer(help="Dataset utilities.", no_args_is_help=True)


@data_app.command("shapes")
def shapes(
    out_dir: Path = typer.Argument(
        ..., help="Folder to write (ImageFolder layout: one subfolder per class)."
    ),
    per_class: int = typer.Option(100, "--per-class", min=1, help="Images per class."),
    image_size: int = typer.Option(
        224, "--image-size", min=32, help="Side of the square images, in pixels."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed; image i of a class depends only on (seed, class, i)."
    ),
    workers: int = typer.Option(
        -1,
        "--workers",
        "-j",
        help="Processes that draw images (-1: one per CPU core; 0: in this process).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate a deterministic synthetic dataset of shapes, with each object's mask.

    Six classes (circle, cross, ring, square, star, triangle) of random colour, size, rotation
    and position on gradient, photo-like and textured backgrounds. Images go to
    OUT_DIR/<class>/*.jpg, masks to OUT_DIR/.masks/<class>/*.png, a summary to OUT_DIR/shapes.json.
    """
    from ..console import err, make_progress
    from ..data.shapes import SHAPES, generate
    from ..errors import InputError

    if workers < 0:
        workers = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another OUT_DIR")
    with make_progress(quiet=quiet) as progress:
        task = progress.add_task("shapes", total=per_class * len(SHAPES), rate="")
        summary = generate(
            out_dir,
            per_class=per_class,
            image_size=image_size,
            seed=seed,
            workers=workers,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    if not quiet:
        err.print(
            f"wrote {summary['images']} images ({per_class} per class, {len(summary['classes'])} classes, "
            f"{image_size}x{image_size}, seed {seed}) to {out_dir}"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
