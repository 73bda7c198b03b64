"""The `vit` command. Each command group lives in its own small module; this one wires them.

Nothing here imports torch at module level: `vit --help` and `vit --version` stay fast.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

import typer

from .._version import __version__
from ..errors import OptionError, VitError
from .common import Group

# Exit statuses, the same for every command: 0 success, 1 a VitError (a file, model or image
# that could not be used; for batch commands, any input that failed), 2 a usage error (Click's
# own checks such as `--top-k 0`, and our OptionError for values Click cannot check).
EXIT_FAILED = 1
EXIT_USAGE = 2


class _VitGroup(Group):
    """Turns every VitError into one red line and exit status 1 (2 for an OptionError), and
    Click's own usage errors into the same one-line form with status 2; bugs keep their
    traceback."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        run = partial(
            super().main,
            args,
            prog_name,
            complete_var,
            standalone_mode=False,
            windows_expand_args=windows_expand_args,
            **extra,
        )
        if not standalone_mode:
            return run()
        try:
            result = run()
        except typer.TyperException as error:  # Click's exceptions, through typer's public name
            if type(error).__name__ == "NoArgsIsHelpError":
                sys.exit(EXIT_USAGE)  # the help has been printed (rich prints while formatting)
            if error.exit_code == EXIT_USAGE:  # a usage error: one line, like ours
                from ..console import print_error

                ctx = getattr(error, "ctx", None)
                where = ctx.command_path if ctx is not None else "vit"
                print_error(f"{error.format_message()} (see '{where} --help')")
                sys.exit(EXIT_USAGE)
            show = getattr(error, "show", None)  # Click's own form, where it has one
            if show is not None:
                show()
            else:
                typer.echo(f"Error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except VitError as error:  # raised while parsing: --version or --help to a full stdout
            from ..console import print_error

            print_error(str(error))
            sys.exit(EXIT_USAGE if isinstance(error, OptionError) else EXIT_FAILED)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(EXIT_FAILED)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VitError as error:
            from ..console import print_error

            print_error(str(error))
            raise typer.Exit(
                EXIT_USAGE if isinstance(error, OptionError) else EXIT_FAILED
            ) from None


EXAMPLES = """\
[bold]Examples[/]

  vit predict photo.jpg                         [dim]# the bundled model: six shapes[/]
  vit predict photos/ -m google/vit-base-patch16-224 -o results.csv
  vit attention photo.jpg --out att/ --html     [dim]# attention sheets and a contact sheet[/]
  vit data shapes shapes/ --per-class 100       [dim]# a labelled folder to train on[/]
  vit train shapes/ --out runs/a --model bundled --epochs 2 --val-split 0.2
  vit predict photo.jpg -m runs/a               [dim]# a run folder is a model[/]

Every command has --help with examples. Guides: README.md and docs/.
"""

app = typer.Typer(
    cls=_VitGroup,
    name="vit",
    help="Vision Transformer image classification, attention maps and training.",
    epilog=EXAMPLES,
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
    from typer.core import TyperCommand

    from . import (
        attention,
        data,
        embed,
        evaluate,
        export,
        inspect,
        models,
        predict,
        score,
        train,
    )
    from .common import Command

    commands = (predict, attention, embed, train, evaluate, data, models, inspect, score, export)
    for module in commands:
        module.register(app)
    # One help style for every command, whichever module registered it (see common.Command).
    typers = [app]
    while typers:
        current = typers.pop()
        for info in current.registered_commands:
            if info.cls in (None, TyperCommand):
                info.cls = Command
        typers.extend(g.typer_instance for g in current.registered_groups if g.typer_instance)


_register()


# Python's default young-generation threshold (700) is tuned for small heaps: importing torch
# leaves about a million long-lived objects, and a one-image `vit predict` then ran three full
# collections over them (~90 ms measured, freeing nothing) plus one more at exit. With 10,000 a
# command starts collection-free; long runs still collect (young objects every 10,000
# allocations, as usual for large-heap programs).
GC_THRESHOLDS = (10_000, 10, 10)


def main() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    # Everything alive at exit is about to go: freezing it skips the interpreter's last full
    # collection over the whole heap (it runs the atexit handlers first).
    atexit.register(gc.freeze)
    from ..console import flush_stdout, guard_stdout, print_error

    guard_stdout()  # a closed or full stdout: one error line and exit 1 (console.py)
    try:
        app()
    except SystemExit as leaving:
        code = leaving.code
    else:
        code = 0
    failed = flush_stdout()  # what is still buffered must reach its reader, or be an error
    if failed is not None:
        print_error(str(failed))
        code = code if isinstance(code, int) and code != 0 else EXIT_FAILED
    sys.exit(code)


def entry() -> None:
    """The `vit` program (the console script, `python -m vitcli`): `main`, then `leave`.
    Callers that embed `main` get its SystemExit, as from any Click program."""
    try:
        main()
    except SystemExit as done:
        leave(done.code)


def leave(code: str | int | None) -> None:
    """Exit with `code`, skipping the interpreter's teardown where nothing is left for it.

    With torch imported, tearing the interpreter down (clearing every module, then the C++
    static destructors of torch's libraries) took 0.3-0.5 s after the last line was written:
    measured on 2 cores, `python -c "import torch"` took 1.6-2.2 s and the same followed by
    `os._exit` 1.2-1.8 s. Once the command is done, that is time a user (or a script calling
    vit in a loop) waits for nothing. So the atexit handlers run as usual (pools, temporary
    files, logging, coverage), the standard streams are flushed, and the process ends there.
    Only when no other thread is alive (a thread still running is left to the normal exit,
    which waits for it) and the code is a status (a message passed to sys.exit prints as usual).
    """
    alone = threading.active_count() == 1
    if "torch" in sys.modules and alone and (code is None or isinstance(code, int)):
        atexit._run_exitfuncs()  # CPython's own exit path, run early
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code or 0)
    sys.exit(code)
