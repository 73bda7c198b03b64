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
    """A progress bar on stderr: done/total, rate, elapsed, ETA; disabled when quiet or piped.
    Transient: the bar is gone when the run ends, only what was printed stays."""
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
        transient=True,
    )


def rows_console(progress: Progress) -> Console:
    """Where a command's results go while `progress` runs: stdout, except when the bar is live
    and stdout is the same kind of terminal, then through the bar's console, which prints
    above the bar. (Printed straight to stdout, rows would land inside the bar's line: rich's
    stdout redirection unwraps itself for a Console that writes to sys.stdout.)"""
    if not progress.disable and stdout_is_terminal():
        return progress.console
    return out


def print_line(message: str, console: Console | None = None) -> None:
    """A summary or status line (rich markup) on stderr: folded at word boundaries to the
    width of a terminal, one unbroken line in a log."""
    console = console or err
    console.print(message, highlight=False, soft_wrap=not console.is_terminal)


def markup(text: str) -> str:
    """`text` made safe for a terminal and escaped for rich markup: for user-controlled text
    (paths, labels, messages) placed inside a markup string."""
    return escape(terminal_safe(text))


def print_error(message: str) -> None:
    print_line(f"[bold red]error:[/] {markup(message)}")


def print_note(message: str) -> None:
    """Something the user should know that is not a problem (why a step takes a while)."""
    print_line(f"note: {markup(message)}")


def print_warning(message: str) -> None:
    print_line(f"[yellow]warning:[/] {markup(message)}")
