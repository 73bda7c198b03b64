"""What things are called: output folder names, and file names made safe to show.

File names on POSIX are bytes; Python holds the ones that are not valid UTF-8 as str with
lone surrogates (surrogateescape: byte 0xff -> U+DCFF). Such a str cannot be encoded as
UTF-8, so everything vitcli shows or writes goes through one of two forms:
- `readable`: for people (sheets, index.html text, the terminal): each undecodable byte as
  `\\xff` and each control character as `\\x1b`, `\\n`, ...; a display form, not reversible;
- `json_text`: for meta.json: the undecodable byte as the JSON escape `\\udcff`, which
  `os.fsencode(json.loads(...))` turns back into the original byte (lossless).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def output_names(paths: list[str]) -> list[str]:
    """One folder name per input, in input order: the stem, then stem-2, stem-3 on collisions
    (compared case-insensitively). Failed inputs keep their name so names never shift."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = _UNSAFE.sub("_", Path(path).stem).strip().lstrip(".") or "image"
        name, counter = stem, 1
        while name.lower() in used:
            counter += 1
            name = f"{stem}-{counter}"
        used.add(name.lower())
        names.append(name)
    return names


def readable(text: str) -> str:
    """`text` for people: undecodable bytes and control characters as backslash escapes."""
    if text.isprintable():
        return text
    text = os.fsencode(text).decode("utf-8", "backslashreplace") if _has_surrogates(text) else text
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def json_text(document: str) -> bytes:
    """A JSON document (json.dumps with ensure_ascii=False) as UTF-8 bytes, lone surrogates
    written as \\udcXX escapes (they only occur inside strings, where that escape is valid)."""
    return document.encode("utf-8", "backslashreplace")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
