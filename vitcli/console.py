"""The rich consoles (results on stdout, everything else on stderr), progress bars, and the
error and warning lines; every text goes through `text.terminal_safe` before a terminal.

Standard output that fails (closed with `>&-`, `>/dev/full`, a file-size limit, a pipe whose
reader went away) raises `StdoutError`: one `error:` line and exit status 1, never a traceback
and never exit 0 with the output lost (`guard_stdout`). A COLUMNS that is not a sensible width
(0, negative, absurd) is ignored, so rich does not print tables zero columns wide.
"""

from __future__ import annotations

import errno
import io
import os
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

from .errors import OutputError
from .fileio import output_error
from .text import terminal_safe

MAX_COLUMNS = 10_000


def _environ() -> dict[str, str]:
    """The environment rich sizes its consoles from, without a COLUMNS/LINES it cannot use."""
    environ = dict(os.environ)
    for name in ("COLUMNS", "LINES"):
        value = environ.get(name, "").strip()
        if name in environ and not (value.isdigit() and 0 < int(value) <= MAX_COLUMNS):
            del environ[name]  # rich then asks the terminal, else assumes 80
    return environ


out = Console(highlight=False, soft_wrap=False, _environ=_environ())
err = Console(stderr=True, highlight=False, _environ=_environ())


class StdoutError(OutputError):
    """Standard output could not be written (closed, full, a size limit, a broken pipe)."""


class _GuardedStdout(io.RawIOBase):
    """File descriptor 1 as a raw stream whose failure raises StdoutError once; later writes
    are dropped (the error is already on its way), so the interpreter's last flush at exit
    cannot fail a second time."""

    def __init__(self, closed: bool) -> None:
        super().__init__()
        self.closed_at_start = closed
        self.failed = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return not self.closed_at_start and os.isatty(1)

    def write(self, data) -> int:
        if self.failed:
            return len(data)
        try:
            if self.closed_at_start:
                raise OSError(errno.EBADF, "it is closed")
            return os.write(1, data)
        except OSError as error:
            self.failed = True
            raise StdoutError(str(output_error("standard output", error, replaced=False))) from None


def guard_stdout() -> None:
    """Put `sys.stdout` on a `_GuardedStdout`. A closed descriptor 0, 1 or 2 gets /dev/null
    first, so that no file opened later takes its number (a model written to descriptor 1
    would receive every print); writes to a stdout closed at start still fail."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
            spare = os.open(os.devnull, os.O_RDWR)
            if spare != fd:
                os.dup2(spare, fd)
                os.close(spare)
    previous = sys.stdout
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_GuardedStdout(closed=1 in closed)),
        encoding=getattr(previous, "encoding", None) or "utf-8",
        errors=getattr(previous, "errors", None) or "strict",
        line_buffering=bool(getattr(previous, "line_buffering", False)),
    )
    if 0 in closed:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (an empty stdin rather than None)
    if 2 in closed:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (lines go nowhere, no raise)


def flush_stdout() -> StdoutError | None:
    """Flush standard output; the StdoutError when that fails (reported by the caller)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except StdoutError as error:
        return error
    return None


def stderr_is_terminal() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


def stdout_is_terminal() -> bool:
    return sys.stdout is not None and sys.stdout.isatty()


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
