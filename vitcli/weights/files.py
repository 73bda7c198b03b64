"""Small checkpoint files, read without torch: JSON configs and safetensors headers.

What `weights/peek.py` needs to learn a checkpoint's preprocessing before torch is imported,
and what the torch readers (readers.py) build on. Like every reader, these refuse anything
that is not a regular file without opening it, and never pass on a library's advice to load
unsafely.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ModelNotFoundError

MAX_JSON_BYTES = 16 * 1024 * 1024  # config.json, preprocessor_config.json, shard indexes
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024
# Words from libraries' error messages that advise loading unsafely; such text is never shown.
_UNSAFE_ADVICE = ("weights_only", "allow_pickle", "trust", "unsafe", "pickle")


def regular_file(path: str | Path) -> os.stat_result:
    """stat() a file we are about to read; refuse FIFOs, devices, sockets and folders.

    Only stat() is called: opening a FIFO for reading would block until a writer appears.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise CheckpointError(
            f"{path}: {kind} (a FIFO, device or socket is never read); "
            "pass a model file or a model folder"
        )
    return info


def read_json(path: str | Path) -> Any:
    """A small JSON file (config.json and friends); errors are one line."""
    path = Path(path)
    info = regular_file(path)
    if info.st_size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{path}: {info.st_size:,} bytes is too large for a config file "
            f"(limit {MAX_JSON_BYTES:,}); download the model again"
        )
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: not valid JSON ({reason}); fix or replace it") from None


def library_reason(error: BaseException) -> str:
    """The first line of a library's error, unless it advises loading unsafely."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if any(word in text.lower() for word in _UNSAFE_ADVICE):
        return type(error).__name__
    return first[:200]


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file from its JSON header alone (no tensor is
    read, torch is not imported); {} when it has none. Errors are one line."""
    path = Path(path)
    info = regular_file(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
            length = int.from_bytes(start, "little") if len(start) == 8 else 0
            if not 0 < length <= min(MAX_SAFETENSORS_HEADER, info.st_size - 8):
                raise CheckpointError(f"{path}: not a readable safetensors header")
            raw = handle.read(length)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors header ({error})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return {}
    return {str(key): str(value) for key, value in metadata.items()}
