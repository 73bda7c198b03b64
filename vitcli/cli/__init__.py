"""The `vit` command. Each command group lives in its own small module; this one wires them.

Nothing here imports torch at module level: `vit --help` and `vit --version` stay fast.
"""

from __future__ import annotations

from typing import Optional

import typer
from typer.core import TyperGroup

from .._version import __version__
from ..errors import VitError


class _VitGroup(TyperGroup):
    """Turns every VitError into one red line and exit status 1; bugs keep their traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VitError as error:
            from ..console import print_error

            print_error(str(error))
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_VitGroup,
    name="vit",
    help="Vision Transformer image classification, attention maps and training.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool | None = typer.Option(
        None,
        "--version",
        "-V",
        callback=_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Vision Transformer image classification, attention maps and training."""


def _register() -> None:
    from . import attention, data, models, predict, train

    for module in (predict, attention, train, data, models):
        module.register(app)
    __import__(f"{__name__}.export", fromlist=["register"]).register(app)  # vit export


_register()


def main() -> None:
    app()
