"""The rich consoles (results on stdout, everything else on stderr), progress bars, and the
error and warning lines; every text goes through `text.terminal_safe` before a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .text import terminal_safe

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def make_progress(*extra_columns, quiet: bool = False) -> Progress:
    """A progress bar on stderr: done/total, rate, elapsed, ETA; disabled when quiet or piped."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not stderr_is_terminal(),
        transient=False,
    )


def markup(text: str) -> str:
    """`text` made safe for a terminal and escaped for rich markup: for user-controlled text
    (paths, labels, messages) placed inside a markup string."""
    return escape(terminal_safe(text))


def print_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {markup(message)}", soft_wrap=True, highlight=False)


def print_note(message: str) -> None:
    """Something the user should know that is not a problem (why a step takes a while)."""
    err.print(f"note: {markup(message)}", soft_wrap=True, highlight=False)


def print_warning(message: str) -> None:
    err.print(f"[yellow]warning:[/] {markup(message)}", soft_wrap=True, highlight=False)
