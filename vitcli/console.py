"""The rich consoles (results on stdout, everything else on stderr), progress bars, and
`terminal_safe`, the one escaping every text goes through before it reaches a terminal."""

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

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

# Characters a terminal acts on instead of showing: C0 controls (ESC starts the sequences that
# clear the screen or retitle the window), DEL, C1 controls (0x9b is a one-byte CSI on some
# terminals) and the bidirectional overrides that make a name read differently from its bytes.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_UNSAFE.update({ord(char): f"\\u{ord(char):04x}" for char in _BIDI})
# A file name that is not valid UTF-8 arrives as lone surrogates (os.fsdecode's
# surrogateescape): show each as the byte it stands for.
_UNSAFE.update({0xDC00 + byte: f"\\x{byte:02x}" for byte in range(0x80, 0x100)})


def terminal_safe(text: str) -> str:
    """`text` with control characters, bidi overrides and undecodable bytes written as visible
    escapes (ESC -> \\x1b, newline -> \\x0a, byte 0xff of a non-UTF-8 name -> \\xff), so that
    nothing printed can move the cursor, recolour or clear the terminal, or fail to encode."""
    safe = text.translate(_UNSAFE)
    # Any other lone surrogate (not from surrogateescape) cannot be encoded either.
    return safe.encode("utf-8", "backslashreplace").decode("utf-8")


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


def print_warning(message: str) -> None:
    err.print(f"[yellow]warning:[/] {markup(message)}", soft_wrap=True, highlight=False)
