"""What things are called: one output folder name per input.

Text shown to people (sheets, index.html, the terminal) goes through `readable`, which is
vitcli.text.terminal_safe (undecodable bytes and control characters as backslash escapes);
meta.json goes through `json_text` (vitcli.text.utf8_json: lossless \\udcXX escapes)."""

from __future__ import annotations

import re
from pathlib import Path

from ...text import terminal_safe as readable
from ...text import utf8_json as json_text

__all__ = ["json_text", "output_names", "readable"]

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


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
