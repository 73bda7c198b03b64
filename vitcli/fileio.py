"""Atomic file writes: a temp file in the target's folder renamed over it, so a reader (or a
kill at any moment) never sees half a file. Used for every file vitcli writes.

Replacing a file behaves as `cp` onto it would: the new file keeps the old one's permission
bits, and a path that is a symlink is written through to the file it points to (the link
stays a link). A write that fails (disk full, read-only folder, file size limit) removes its
temp file before the error propagates.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_target(path: str | Path) -> Path:
    """The file a write to `path` replaces: `path` itself, or, when it is a symlink, the file
    the link points to (followed to the end, created if it does not exist yet)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _mode_for(target: Path) -> int:
    """The permission bits of the file being replaced, or what a plain open() would give."""
    try:
        existing = os.stat(target)
    except OSError:
        return 0o666 & ~_UMASK
    return stat.S_IMODE(existing.st_mode) if stat.S_ISREG(existing.st_mode) else 0o666 & ~_UMASK


def temp_file_beside(path: Path) -> tuple[int, str]:
    """(fd, temp path) in the folder of `path`, which must already be resolved with
    `write_target`; the temp file has the mode the replaced file has (mkstemp alone makes it
    0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # NAME.PID.RANDOM: unique per process (mkstemp's O_EXCL makes it unique in any case), and
    # a leftover names the process that left it.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name[:200]}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        os.fchmod(fd, _mode_for(path))
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` atomically. `durable` also fsyncs the file and its folder, so the
    new content survives a power cut (checkpoints); skip it for cheap, numerous outputs."""
    target = write_target(path)
    fd, tmp = temp_file_beside(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(target.parent)


def output_error(where: str, error: OSError, replaced: bool = True) -> OutputError:
    """The one-line error for an output that could not be written: the cause in words and
    what to do. `where` names the output (`--output x.json`, `standard output`)."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space or write somewhere else"
    elif error.errno == errno.EFBIG:
        hint = "the file size limit (ulimit -f) was reached; raise it or write somewhere else"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a folder you can write to"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        hint = "a part of the path is a file, not a folder; choose another path"
    elif error.errno == errno.EPIPE:
        hint = "the reader of the pipe went away"
    elif error.errno == errno.EBADF:
        hint = "redirect it to a file or /dev/null instead"
    else:
        hint = "choose another path"
    kept = " (nothing was replaced)" if replaced else ""
    return OutputError(f"{where}: cannot write ({reason}){kept}; {hint}")


def write_output(path: str | Path, data: bytes, option: str = "--output") -> None:
    """`atomic_write_bytes` for a file the user named: any OSError becomes one OutputError
    line naming `option` (a read-only folder, a full disk, a file size limit, a path under a
    regular file)."""
    with output_errors(f"{option} {path}".strip()):
        atomic_write_bytes(path, data, durable=False)


@contextlib.contextmanager
def output_errors(where: str) -> Iterator[None]:
    """Inside: any OSError of writing an output becomes one OutputError line naming
    `where` (temporary files are removed by the atomic writers before it gets here)."""
    try:
        yield
    except OSError as error:
        raise output_error(where, error) from None


# In every folder vitcli creates for its outputs (sheets, inspect panels): the input scanners
# (data/inputs.py, data/folder.py) skip folders holding it, so a run's outputs never become
# the next run's inputs. `.vitcli-attention` is what earlier versions wrote.
OUTPUT_MARKER = ".vitcli-output"
OUTPUT_MARKERS = (OUTPUT_MARKER, ".vitcli-attention")
_MARKER_TEXT = (
    b"Written by vitcli. Folders holding this file are outputs: they are skipped when vitcli "
    b"scans a folder for input images.\n"
)


def mark_output_folder(folder: Path) -> None:
    """Mark `folder` as an output of vitcli (see OUTPUT_MARKER)."""
    marker = folder / OUTPUT_MARKER
    if not marker.exists():
        atomic_write_bytes(marker, _MARKER_TEXT, durable=False)


def is_output_folder(folder: str | Path) -> bool:
    """Whether `folder` holds an output marker (one stat per marker name, nothing opened)."""
    return any(os.path.lexists(os.path.join(folder, name)) for name in OUTPUT_MARKERS)
