"""Options shared by several commands: one declaration each, so that the same flag means the
same thing (name, short form, default, help) in predict, attention, embed, train and eval.

Use them as annotations:

    def predict(model: ModelOption = None, device: DeviceOption = "auto", ...)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from ..errors import OptionError
from ..runtime import MAX_BATCH


def whole_number(option: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An option's parser (typer's `parser=`): a whole number from `low` (to `high`), refused
    in our words with exit 2, and no `[x>=1]` range placeholder in --help."""
    span = f"from {low} to {high}" if high is not None else f"{low} or more"

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise OptionError(f"{option} must be a whole number {span}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise OptionError(f"{option} must be a whole number {span}, got {value}")
        return value

    return parse


def number(option: str, low: float) -> Callable[[str], float]:
    """An option's parser: a finite number, `low` or more, refused in our words (exit 2)."""

    def parse(text: str) -> float:
        try:
            value = float(str(text).strip())
        except ValueError:
            raise OptionError(f"{option} must be a number, {low:g} or more, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise OptionError(f"{option} must be a number, {low:g} or more, got {text}")
        return value

    return parse


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


def _workers_option(default: str):
    return Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-w",
            metavar="N",
            show_default=False,
            help="Decoding processes, 0 to 64 (0 decodes in the main process; at most the CPU "
            f"count). \\[default: {default}]",
        ),
    ]


WorkersOption = _workers_option("half the CPUs, 1 to 8")
# vit train's: on 2 CPUs the step needs both cores (runtime.default_training_workers).
TrainWorkersOption = _workers_option(
    "half the CPUs, 1 to 8; none on 2 CPUs or fewer, where the main process decodes between steps"
)

BatchSizeOption = Annotated[
    int,
    typer.Option(
        "--batch-size", "-b", metavar="N", help=f"Images per forward pass, 1 to {MAX_BATCH}."
    ),
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

FastDecodeOption = Annotated[
    bool,
    typer.Option(
        "--fast-decode",
        metavar="",
        help="Decode large JPEGs at a reduced scale (JPEG draft mode): several times faster "
        "to read, but not the home library's pixels (outputs move by up to ~2% of their "
        "range; docs/models.md). Off by default: every image is decoded in full.",
    ),
]

# The old short form of --workers (train, eval, data), kept working but out of --help.
JobsAlias = Annotated[int | None, typer.Option("-j", hidden=True, show_default=False)]


class Command(TyperCommand):
    """A command whose --help reads the same everywhere: flags show no `<bool>` placeholder,
    arguments are named in capitals (INPUTS, DATA, OUT_DIR) without a `<list[str]>` or `<path>`
    type, and numeric ranges are said in the option's help and checked by our own parsers
    (`whole_number`, `number`) or options objects, never as `<int range> [x>=1]`. Every
    command gets this class (see `vitcli.cli._register`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            # Instance attributes shadow typer's display methods for this command's help only.
            if isinstance(param, TyperArgument):
                if param.metavar is None and param.name:
                    param.metavar = param.name.upper()
                param.display_type_rich = _no_type  # type: ignore[method-assign]
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""

    def invoke(self, ctx):
        # `vit train -q` still logs its notes (one plain line per epoch); elsewhere -q is silence.
        _note_run_folder(ctx.params, quiet=bool(ctx.params.get("quiet")) and self.name != "train")
        return super().invoke(ctx)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Group(TyperGroup):
    """A command group whose --help reads like a command's: flags (--version, the completion
    options typer adds after construction, --help) show no `<bool>` placeholder."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


def _note_run_folder(params: dict, quiet: bool) -> None:
    """`-m runs/a` (a `vit train --out` folder): one note naming the model file it stands for,
    before anything loads. Every command's model is its `model` parameter (`source` in
    `vit convert`)."""
    import os

    reference = params.get("model", params.get("source"))
    if reference is None and "model" in params:
        reference = os.environ.get("VIT_MODEL", "").strip() or None
    if not isinstance(reference, str) or quiet:
        return
    if not os.path.isdir(os.path.expanduser(reference)):
        return
    from ..distributed import is_main
    from ..weights.locate import run_folder_model

    found = run_folder_model(os.path.expanduser(reference))
    if found is not None and is_main():
        from ..console import print_note

        print_note(found[1])


def _no_type(ctx=None) -> None:
    return None


def batch_progress(name: str, show: bool):
    """(progress bar, on_progress(done, total)) for a streaming batch command; the bar shows
    images per second since it started."""
    import time

    from ..console import make_progress

    progress = make_progress(quiet=not show)
    task = progress.add_task(name, total=None, rate="")
    started = time.perf_counter()

    def on_progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        rate = f"{done / elapsed:.1f} img/s" if elapsed > 0 and done else ""
        progress.update(task, completed=done, total=total, rate=rate)

    return progress, on_progress


def batch_summary(summary, verb: str, where: str, tail: str = "", by: str = "") -> str:
    """'N of M images <verb>[, K failed][<by>] in S s (R img/s, <where>[ x W ranks])<tail>', as
    rich markup; the rate only when something succeeded (a run that read nothing has no speed)."""
    ranks = f" x {summary.world_size} ranks" if summary.world_size > 1 else ""
    rate = (
        f"{summary.succeeded / summary.seconds:.1f} img/s, "
        if summary.succeeded and summary.seconds > 0
        else ""
    )
    failed = f", [red]{summary.failed} failed[/]" if summary.failed else ""
    return (
        f"{summary.succeeded} of {summary.total} images {verb}{failed}{by} in "
        f"{summary.seconds:.1f} s ({rate}{where}{ranks}){tail}"
    )
