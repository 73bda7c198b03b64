"""Turning what the user typed (files, folders, globs, '-' for stdin) into an ordered list.

Only regular files are ever read: a FIFO, socket or device named like an image becomes an
error item without being opened (opening a FIFO for reading blocks until a writer comes). Folder
scans and globs never follow a symlinked folder, so a link loop (`loop -> ..`, `self -> .`)
can neither hang a scan nor list a file twice; a symlink to a file is read like the file.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..fileio import is_output_folder
from .images import IMAGE_EXTENSIONS, is_image_path

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> list:
    """Sort key where 'img2' < 'img10' (case-insensitive, digits compared as numbers)."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in _DIGITS.split(text)
    ]


@dataclass(frozen=True)
class InputItem:
    """One input in output order; `error` is set for a named path that can't be an image."""

    path: str
    error: str | None = None


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(path: str, mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return f"{path}: not a regular file ({kind}); only regular image files are read"


def _stat_error(path: str, error: OSError) -> str:
    """A one-line reason for a path that cannot be looked at."""
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            return f"{path}: broken symbolic link (its target does not exist)"
        return f"{path}: no such file or folder"
    if error.errno == errno.ENAMETOOLONG:
        return f"{path}: file name too long for this system; rename or move the file"
    if error.errno == errno.ELOOP:
        return f"{path}: symbolic link loop"
    if isinstance(error, PermissionError):
        return f"{path}: permission denied; check the folder's permissions"
    return f"{path}: cannot look at this path ({error.strerror or error})"


def _file_item(path: str, *, named: bool) -> InputItem | None:
    """An item for a path that is not a folder; None for a scanned non-image (skipped)."""
    if not is_image_path(path):
        if not named:
            return None
        suffix = os.path.splitext(path)[1] or "none"
        return InputItem(path, error=f"{path}: not an image file (unsupported extension {suffix})")
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return InputItem(path, error=_stat_error(path, error))
    if not stat.S_ISREG(mode):
        return InputItem(path, error=_not_regular(path, mode))
    return InputItem(path)


class _Excluded:
    """Folders whose contents are never inputs (e.g. the output folder of an earlier run);
    `outputs`: also every folder below a scan's start that holds fileio.OUTPUT_MARKER."""

    def __init__(self, folders: Iterable[str | Path], outputs: bool = True) -> None:
        self.folders = [os.path.realpath(folder) for folder in folders]
        self.outputs = outputs

    def __call__(self, path: str) -> bool:
        if not self.folders:
            return False
        real = os.path.realpath(path)
        return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in self.folders)


def _scan_folder_items(folder: str, excluded: _Excluded | None = None) -> list[InputItem]:
    """Images under `folder` in natural order, plus an error item for each folder that cannot
    be listed (skipping it silently would lose its images) and for each image-named entry that
    is not a regular file. Hidden entries are skipped; symlinked folders are not entered."""
    found: list[InputItem] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        if excluded is not None and excluded(current):
            continue
        skip_outputs = excluded is None or excluded.outputs
        if skip_outputs and current != folder and is_output_folder(current):
            continue  # another run's outputs (fileio.OUTPUT_MARKER): never inputs
        try:
            with os.scandir(current) as listing:
                entries = list(listing)
        except OSError as error:
            reason = (
                "permission denied"
                if isinstance(error, PermissionError)
                else (error.strerror or str(error))
            )
            found.append(
                InputItem(
                    current,
                    error=f"{current}: cannot list folder ({reason}); its images were skipped",
                )
            )
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
                if entry.is_symlink() and entry.is_dir():
                    continue  # a symlinked folder: never entered (loops, duplicates)
                if not is_image_path(entry.name):
                    continue
                if entry.is_file():
                    found.append(InputItem(entry.path))
                    continue
            except OSError:
                pass
            item = _file_item(entry.path, named=False)
            if item is not None:
                found.append(item)
    return sorted(found, key=lambda item: natural_key(item.path))


def _join(base: str, name: str) -> str:
    return os.path.join(base, name) if base else name


def _subfolders(base: str, skip_outputs: bool = True) -> Iterator[str]:
    """Every non-hidden folder below `base`, symlinked folders not entered (nor, with
    `skip_outputs`, folders holding fileio.OUTPUT_MARKER)."""
    pending = [base]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current or ".") as listing:
                entries = sorted(listing, key=lambda entry: natural_key(entry.name))
        except OSError:
            continue
        below = [
            _join(current, entry.name)
            for entry in entries
            if not entry.name.startswith(".")
            and _is_real_dir(entry)
            and not (skip_outputs and is_output_folder(_join(current, entry.name)))
        ]
        yield from below
        pending.extend(reversed(below))


def _is_real_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def glob_paths(pattern: str, skip_outputs: bool = True) -> list[str]:
    """Paths matching `pattern` (`*`, `?`, `[...]` within a name, `**` for any depth of
    folders). Unlike glob.glob(recursive=True), `**` never enters a symlinked folder, and a
    wildcard only matches a symlinked folder as the last part of the pattern: a folder spelled
    out in full is followed. Hidden names match only a part that starts with '.'."""
    pattern = os.path.expanduser(pattern)
    base = os.sep if pattern.startswith(os.sep) else ""
    parts = [part for part in pattern.split(os.sep) if part not in ("", ".")]
    results: dict[str, None] = {}

    def match(current: str, index: int) -> None:
        if index == len(parts):
            if current:
                results[current] = None
            return
        part = parts[index]
        last = index == len(parts) - 1
        if part == "**":
            match(current, index + 1)
            for folder in _subfolders(current, skip_outputs):
                match(folder, index + 1)
            return
        if not glob.has_magic(part):
            candidate = _join(current, part)
            if last:
                if os.path.lexists(candidate):
                    results[candidate] = None
            elif os.path.isdir(candidate):
                match(candidate, index + 1)
            return
        try:
            with os.scandir(current or ".") as listing:
                entries = sorted(listing, key=lambda entry: natural_key(entry.name))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") and not part.startswith("."):
                continue
            if not fnmatch.fnmatchcase(entry.name, part):
                continue
            if last:
                results[_join(current, entry.name)] = None
            elif _is_real_dir(entry):
                match(_join(current, entry.name), index + 1)

    match(base, 0)
    return sorted(results, key=natural_key)


def _stdin_lines(stdin: Iterable[str] | None) -> Iterator[str]:
    if stdin is not None:
        yield from stdin
        return
    # Bytes, decoded as the OS decodes file names: a name that is not UTF-8 survives.
    for raw in sys.stdin.buffer:
        yield os.fsdecode(raw)


def collect_inputs(
    arguments: Iterable[str],
    stdin: Iterable[str] | None = None,
    *,
    exclude: Iterable[str | Path] = (),
    skip_outputs: bool = True,
    allow_empty: bool = False,
) -> list[InputItem]:
    """Expand arguments in the order given. Folders are scanned recursively (images only, in
    natural order, other files skipped silently); globs are expanded; '-' reads paths from
    stdin, one per line. A named file that isn't a regular image file becomes an item with an
    error. Anything inside an `exclude` folder is left out (e.g. a command's own output folder),
    and, with `skip_outputs`, anything in a folder below a scan's start that holds
    fileio.OUTPUT_MARKER (another run's outputs). Nothing found at all is an InputError
    (`no_images_error`) unless `allow_empty`.
    """
    arguments = list(arguments)
    excluded = _Excluded(exclude, outputs=skip_outputs)
    items: list[InputItem] = []
    seen_any = False
    for argument in arguments:
        seen_any = True
        if argument == "-":
            for line in _stdin_lines(stdin):
                line = line.strip()
                if line:
                    items.extend(_expand_one(line, excluded))
            continue
        items.extend(_expand_one(argument, excluded))
    if not seen_any:
        raise InputError(
            "no inputs given: pass image files, folders, globs, or '-' to read paths from stdin"
        )
    if excluded.folders:
        items = [item for item in items if not excluded(item.path)]
    if not items and not allow_empty:
        raise no_images_error(arguments)
    return items


def no_images_error(arguments: Iterable[str], why: str = "") -> InputError:
    """The one line for a run that found nothing to read: where it looked, what counts."""
    places = [
        "the paths on stdin" if argument == "-" else (argument or repr(argument))
        for argument in arguments
    ]
    shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
    extensions = " ".join(sorted(IMAGE_EXTENSIONS))
    return InputError(
        f"no images found in {shown}{why} (folders are searched recursively for {extensions}); "
        "pass image files, a folder holding some, or a quoted glob"
    )


def _expand_one(argument: str, excluded: _Excluded) -> list[InputItem]:
    expanded = os.path.expanduser(argument)
    shown = str(Path(expanded)) if expanded else argument
    try:
        mode = os.stat(expanded).st_mode
    except OSError as error:
        if error.errno == errno.ENOENT and glob.has_magic(argument):
            return _expand_glob(argument, excluded)
        return [InputItem(shown, error=_stat_error(shown, error))]
    except ValueError:  # an embedded NUL byte
        return [InputItem(argument, error=f"{argument!r}: not a valid file name")]
    if stat.S_ISDIR(mode):
        return _scan_folder_items(shown, excluded)
    item = _file_item(shown, named=True)
    assert item is not None  # named paths always give an item
    return [item]


def _expand_glob(argument: str, excluded: _Excluded) -> list[InputItem]:
    result: list[InputItem] = []
    for match in glob_paths(argument, excluded.outputs):
        if os.path.isdir(match):
            result.extend(_scan_folder_items(match, excluded))
        else:
            item = _file_item(match, named=False)
            if item is not None:
                result.append(item)
    # A match inside another matched folder (`photos/**` matches both a folder and its
    # files) is listed once.
    unique = list({item.path: item for item in reversed(result)}.values())[::-1]
    if not unique:
        return [InputItem(argument, error=f"{argument}: the pattern matched no images")]
    return unique


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names after following links; None if it does not exist."""
    try:
        stat_ = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat_.st_dev, stat_.st_ino


def refuse_output_among_inputs(output: str | Path, items: Iterable[InputItem], flag: str) -> None:
    """Raise InputError when `output` is one of the inputs: the same file by name, through a
    symlink or as a hard link (same device and inode). Call it before anything is opened for
    writing, so that `vit predict img.jpg -o img.jpg` never truncates the image it reads."""
    target = _identity(output)
    if target is None:
        return
    for item in items:
        if item.error is None and _identity(item.path) == target:
            raise InputError(
                f"{flag} {output} is one of the inputs ({item.path}); "
                "choose an output path that is not an image being read"
            )


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True when `path` lies inside `folder` (both resolved, links followed)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True
