"""A cheap fingerprint of where a loaded model's weights came from, for caches keyed by them.

Hashing every weight of a B/16 (344 MB) takes about as long as the rest of a warm `--int8`
start-up, so `load_model` stamps each bundle with what identifies its source instead: every
regular file of the checkpoint (the file itself, or the files at the top of its folder) by
resolved path, size, modification time in nanoseconds and a hash of its first 64 KiB (which
holds a safetensors header, and with it every tensor's name, dtype, shape and offset). The
stamp also notes each tensor's storage and version counter at load: a weight replaced or
changed in place afterwards (a fine-tuning step, `load_state_dict`, `.to(dtype)`) no longer
matches, and `matches` says so, so a cache falls back to hashing the weights themselves.
(A file rewritten within the file system's timestamp resolution, keeping its size and first
64 KiB, would go unseen: the cost of not reading every byte.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class SourceStamp:
    files: str  # sha256 over each source file's path, size, mtime_ns and first 64 KiB
    tensors: tuple[tuple[str, int, int, bytes], ...]  # per tensor at load: see _tensor_marks

    def matches(self, model: nn.Module) -> bool:
        """Whether `model` still holds, unchanged, the tensors read from the source."""
        marks = _tensor_marks(model)
        return marks is not None and marks == self.tensors


def stamp(path: Path, model: nn.Module) -> SourceStamp | None:
    """The stamp of `model` as just read from `path` (a file or a folder); None when a file
    cannot be read or a tensor has no version counter (then caches hash the weights)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    try:
        for file in files:
            info = os.stat(file)
            digest.update(f"{file.resolve()}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(HEAD_BYTES))
    except OSError:
        return None
    tensors = _tensor_marks(model)
    return None if tensors is None else SourceStamp(files=digest.hexdigest(), tensors=tensors)


def _tensor_marks(model: nn.Module) -> tuple[tuple[str, int, int, bytes], ...] | None:
    """Per tensor: name, storage address, version counter and its first 16 values' bytes
    (a tensor freed and reallocated at the same address with the same version, as by
    `.half().float()`, still differs there). None for anything else than plain tensors (an
    int8 model's packed weights, inference-mode tensors without a version counter)."""
    import torch

    marks = []
    try:
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not isinstance(tensor, torch.Tensor) or tensor.is_quantized:
                return None
            head = tensor.detach().reshape(-1)[:16].contiguous().cpu()
            marks.append(
                (name, tensor.data_ptr(), tensor._version, head.view(torch.uint8).numpy().tobytes())
            )
    except (RuntimeError, TypeError, AttributeError):
        return None
    return tuple(marks)
