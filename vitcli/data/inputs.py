"""Turning what the user typed (files, folders, globs, '-' for stdin) into an ordered list."""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .images import is_image_path

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


def _scan_folder(folder: Path) -> list[str]:
    return [item.path for item in _scan_folder_items(folder) if item.error is None]


def _scan_folder_items(folder: Path) -> list[InputItem]:
    """Images under `folder` in natural order, plus an error item for each folder that cannot
    be listed (os.walk would otherwise skip it silently and lose its images)."""
    found: list[InputItem] = []

    def unreadable(error: OSError) -> None:
        where = error.filename or str(folder)
        reason = (
            "permission denied"
            if isinstance(error, PermissionError)
            else (error.strerror or str(error))
        )
        found.append(
            InputItem(
                str(where), error=f"{where}: cannot list folder ({reason}); its images were skipped"
            )
        )

    for root, dirs, files in os.walk(folder, followlinks=False, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(
            InputItem(os.path.join(root, name))
            for name in files
            if is_image_path(name) and not name.startswith(".")
        )
    return sorted(found, key=lambda item: natural_key(item.path))


def collect_inputs(arguments: Iterable[str], stdin: Iterable[str] | None = None) -> list[InputItem]:
    """Expand arguments in the order given. Folders are scanned recursively (images only, in
    natural order, other files skipped silently); globs are expanded; '-' reads paths from
    stdin, one per line. A named file that isn't an image becomes an item with an error.
    """
    items: list[InputItem] = []
    seen_any = False
    for argument in arguments:
        seen_any = True
        if argument == "-":
            lines = stdin if stdin is not None else sys.stdin
            for line in lines:
                line = line.strip()
                if line:
                    items.extend(_expand_one(line))
            continue
        items.extend(_expand_one(argument))
    if not seen_any:
        raise InputError(
            "no inputs given: pass image files, folders, globs, or '-' to read paths from stdin"
        )
    return items


def _expand_one(argument: str) -> list[InputItem]:
    path = Path(argument).expanduser()
    if path.is_dir():
        return _scan_folder_items(path)
    if path.exists():
        if not is_image_path(path):
            return [
                InputItem(
                    str(path),
                    error=f"{path}: not an image file (unsupported extension {path.suffix or 'none'})",
                )
            ]
        return [InputItem(str(path))]
    if glob.has_magic(argument):
        matches = sorted(glob.glob(os.path.expanduser(argument), recursive=True), key=natural_key)
        result = []
        for match in matches:
            if os.path.isdir(match):
                result.extend(_scan_folder_items(Path(match)))
            elif is_image_path(match):
                result.append(InputItem(match))
        if not result:
            return [InputItem(argument, error=f"{argument}: the pattern matched no images")]
        return result
    return [InputItem(str(path), error=f"{path}: no such file or folder")]


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names after following links; None if it does not exist."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino


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
