"""`vit data ...`: dataset utilities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..runtime import MAX_IMAGE_SIDE
from ..text import terminal_safe
from .common import Group, QuietOption

GROUP_EXAMPLES = """\
[bold]Examples[/]

  vit data shapes shapes/ --per-class 100       [dim]# six classes, one shape per image[/]
  vit data shapes pairs/ --objects 2 --per-class 40   [dim]# two shapes per image[/]
"""

data_app = typer.Typer(
    cls=Group,
    help="Dataset utilities: synthetic labelled image folders to train, evaluate and score on.",
    epilog=GROUP_EXAMPLES,
    no_args_is_help=True,
)

MAX_PER_CLASS = 1_000_000
MAX_IMAGE_SIZE = MAX_IMAGE_SIDE


EXAMPLES = """\
[bold]Examples[/]

  vit data shapes shapes-train --per-class 2000 --seed 0
  vit data shapes shapes-test --per-class 200 --seed 2 --workers 2
  vit data shapes pairs --objects 2 --per-class 20   [dim]# for vit score[/]
  vit data shapes mixed --per-class 2000 --pairs 300  [dim]# both kinds, for vit train[/]
"""


@data_app.command("shapes", epilog=EXAMPLES)
def shapes(
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder to write (ImageFolder layout: one subfolder per class).",
            show_default=False,
        ),
    ],
    per_class: Annotated[
        int, typer.Option("--per-class", metavar="N", help="Images per class, 1 to 1000000.")
    ] = 100,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size", metavar="N", help="Side of the square images, 32 to 4096 pixels."
        ),
    ] = 224,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            metavar="N",
            help="Seed, 0 to 2^63-1; image i of a class depends only on (seed, class, i).",
        ),
    ] = 0,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-w",
            "-j",
            metavar="N",
            show_default=False,
            help="Processes that draw images (0: in this process; at most the CPU count). "
            "\\[default: one per CPU]",
        ),
    ] = None,
    quiet: QuietOption = False,
    objects: Annotated[
        int,
        typer.Option(
            "--objects",
            metavar="N",
            help="Objects per image. 2: two shapes of different classes, --per-class images "
            "per pair, in OUT_DIR/<a>+<b>/, masks .masks/<a>+<b>/<stem>.<a>.png and .<b>.png.",
        ),
    ] = 1,
    pairs: Annotated[
        int,
        typer.Option(
            "--pairs",
            metavar="N",
            help="Also write N two-object images per pair of classes into OUT_DIR/<a>+<b>/, "
            "beside the one-object class folders; `vit train` learns both classes from them.",
        ),
    ] = 0,
) -> None:
    """Generate a deterministic synthetic dataset of shapes, with each object's mask.

    Six classes (circle, cross, ring, square, star, triangle) of random colour, size, rotation \
and position on gradient, photo-like and textured backgrounds. Images go to \
OUT_DIR/<class>/*.jpg, masks to OUT_DIR/.masks/<class>/*.png, a summary to OUT_DIR/shapes.json. \
Guide: docs/train.md.
    """
    from ..console import err, make_progress, print_warning
    from ..data.shapes import SHAPES, generate
    from ..errors import InputError, OptionError
    from ..runtime import cpu_count, resolve_workers

    if not 1 <= per_class <= MAX_PER_CLASS:
        raise OptionError(f"--per-class must be from 1 to {MAX_PER_CLASS}, got {per_class}")
    if not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise OptionError(f"--image-size must be from 32 to {MAX_IMAGE_SIZE}, got {image_size}")
    if not 0 <= seed <= 2**63 - 1:
        raise OptionError(f"--seed must be from 0 to 2^63-1, got {seed}")
    if objects not in (1, 2):
        raise OptionError(f"--objects must be 1 or 2, got {objects}")
    if not 0 <= pairs <= MAX_PER_CLASS:
        raise OptionError(f"--pairs must be from 0 to {MAX_PER_CLASS}, got {pairs}")
    if pairs and objects != 1:
        raise OptionError("--pairs adds two-object images to one-object folders: drop --objects 2")
    count, warning = resolve_workers(workers if workers is not None else cpu_count())
    if warning:
        print_warning(warning)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another OUT_DIR")
    with make_progress(quiet=quiet) as progress:
        pair_count = len(SHAPES) * (len(SHAPES) - 1) // 2
        total = per_class * (len(SHAPES) if objects == 1 else pair_count) + pairs * pair_count
        task = progress.add_task("shapes", total=total, rate="")
        try:
            summary = generate(
                out_dir,
                per_class=per_class,
                image_size=image_size,
                seed=seed,
                workers=count,
                objects=objects,
                pairs=pairs,
                progress=lambda done, total: progress.update(task, completed=done),
            )
        except OSError as error:
            raise InputError(
                f"{out_dir}: cannot write ({error.strerror or error}); "
                "choose a writable OUT_DIR with free space"
            ) from None
    if not quiet:
        unit = "class" if objects == 1 else "pair"
        also = f", {pairs} per pair" if pairs else ""
        err.print(
            terminal_safe(
                f"wrote {summary['images']} images ({per_class} per {unit}{also}, "
                f"{len(summary['classes'])} classes, {image_size}x{image_size}, seed {seed}) "
                f"to {out_dir}"
            ),
            markup=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
