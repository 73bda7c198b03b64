"""Options shared by several commands: one declaration each, so that the same flag means the
same thing (name, short form, default, help) in predict, attention, embed, train and eval.

Use them as annotations:

    def predict(model: ModelOption = None, device: DeviceOption = "auto", ...)
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from typer.core import TyperCommand


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="REF",
        show_default=False,
        help="Model file, folder or hub id (org/name). \\[default: the bundled model]",
    ),
]

DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="auto|cpu|cuda|cuda:N|mps",
        help="Where the model runs; auto picks cuda, then mps, then cpu.",
    ),
]

DTypeOption = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="auto: float32 on CPU and MPS, bfloat16 on CUDA (float16 on older GPUs).",
    ),
]

WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-w",
        metavar="N",
        min=0,
        show_default=False,
        help="Decoding processes (0 decodes in the main process; at most the CPU count). "
        "\\[default: half the CPUs, 1 to 8]",
    ),
]

BatchSizeOption = Annotated[
    int,
    typer.Option("--batch-size", "-b", metavar="N", help="Images per forward pass."),
]

QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", metavar="", help="No progress bar and no summary unless something failed."
    ),
]

Int8Option = Annotated[
    bool,
    typer.Option(
        "--int8",
        metavar="",
        help="Run the Linear layers in int8 (CPU only, float32 around them; ~3x faster on "
        "large models). docs/int8.md",
    ),
]

# The old short form of --workers (train, eval, data), kept working but out of --help.
JobsAlias = Annotated[int | None, typer.Option("-j", hidden=True, show_default=False)]


class Command(TyperCommand):
    """A command whose --help shows no `<bool>` placeholder (flags take no value). Use it as
    `app.command("name", cls=Command)`."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option
