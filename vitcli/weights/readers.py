"""Reading checkpoint files safely: shapes from headers first, bytes only when asked.

Every reader here
- refuses anything that is not a regular file (a FIFO, device or socket) without opening it;
- learns tensor names, shapes and dtypes from the file's header (safetensors' JSON header,
  the .npy headers inside an .npz, the pickle of a torch zip file mapped from disk) and can
  hand them back as meta tensors, so that a loader compares them with the architecture before
  a byte of tensor data is read;
- never unpickles code (`torch.load(weights_only=True)`, numpy without pickles) and never
  passes on a library's advice to load unsafely.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .files import MAX_SAFETENSORS_HEADER, library_reason, regular_file
from .limits import max_parameters

MAX_NPZ_MEMBERS = 100_000
# A ViT-H/14 file has ~400 tensors and a 50 kB header; safetensors itself allows 100 MB.
MAX_TENSORS = 100_000

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# -- safetensors -------------------------------------------------------------------------------
def read_safetensors(
    path: str | Path, meta: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, with a clear error for anything else.

    The header is read first (safetensors validates offsets against the file's size) and the
    total size is checked against the parameter limit before any data is read. `meta=True`
    returns meta tensors with the declared shapes and dtypes: nothing is read but the header.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    info = regular_file(path)
    with open(path, "rb") as handle:
        start = handle.read(8)
    if start[:2] == b"\x80\x02" or start[:2] == b"PK":
        raise CheckpointError(
            f"{path}: this is a pickle/zip (torch.save) file, not safetensors; "
            "rename it to .bin inside its model folder, or convert it with `vit convert`"
        )
    header_length = int.from_bytes(start, "little") if len(start) == 8 else 0
    if header_length > info.st_size - 8:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (its header length is beyond the file's "
            f"{info.st_size:,} bytes); the file may be truncated or corrupt, "
            "download or convert it again"
        )
    if header_length > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            f"{path}: a safetensors header of {header_length:,} bytes is more than a model's "
            f"(limit {MAX_SAFETENSORS_HEADER:,}); not a checkpoint vitcli reads"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            if len(names) > MAX_TENSORS:
                raise CheckpointError(
                    f"{path}: {len(names):,} tensors is more than a model holds "
                    f"(limit {MAX_TENSORS:,})"
                )
            shapes: dict[str, tuple[tuple[int, ...], str]] = {}
            for name in names:
                tensor_slice = handle.get_slice(name)
                shapes[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
            total = sum(math.prod(shape) for shape, _ in shapes.values())
            limit = max_parameters()
            if total > limit:
                raise CheckpointError(
                    f"{path}: declares {total:,} numbers, more than vitcli loads ({limit:,}); "
                    "set VITCLI_MAX_PARAMETERS to raise the limit"
                )
            if meta:
                tensors = {
                    name: torch.empty(
                        shape, dtype=_SAFETENSORS_DTYPES.get(kind, torch.uint8), device="meta"
                    )
                    for name, (shape, kind) in shapes.items()
                }
            else:
                tensors = {name: handle.get_tensor(name) for name in shapes}
    except (SafetensorError, ValueError, OSError, TypeError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({library_reason(error)}); "
            "the file may be truncated or corrupt, download or convert it again"
        ) from None
    return tensors, metadata


# -- torch pickles -----------------------------------------------------------------------------
def read_torch_pickle(path: str | Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, read with weights_only=True: no code from the file runs.

    The file is memory-mapped (`mmap=True`), so tensors are views of the file and cost no
    memory until used; `meta=True` returns meta tensors of the same shapes. Only the zip
    format (torch >= 1.6) can be mapped; older files are refused.
    """
    import pickle

    path = Path(path)
    regular_file(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch zip file (an old-style torch.save, or not a checkpoint); "
            "save it again with a current torch, or use a .safetensors file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds objects other than tensors (code or custom classes), which vitcli "
            "never loads; convert it to .safetensors where it was made"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, IndexError) as error:
        raise CheckpointError(
            f"{path}: cannot be read as a plain torch state dict ({library_reason(error)}); "
            "it may be truncated or corrupt, use a .safetensors file instead"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    total = sum(tensor.numel() for tensor in state.values())
    if total > max_parameters():
        raise CheckpointError(
            f"{path}: holds {total:,} numbers, more than vitcli loads ({max_parameters():,}); "
            "set VITCLI_MAX_PARAMETERS to raise the limit"
        )
    if meta:
        return {name: tensor.to("meta") for name, tensor in state.items()}
    return state


# -- numpy .npz --------------------------------------------------------------------------------
class NpzArchive(Mapping[str, np.ndarray]):
    """The arrays of an .npz, described by their .npy headers and read one at a time.

    Opening reads only the zip directory and each member's .npy header: object arrays
    (pickles) are refused, and so is a header that declares more bytes than the member holds.
    `shapes` and `nbytes` are then known for a size check before anything is decompressed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        regular_file(path)
        with open(path, "rb") as handle:
            start = handle.read(6)
        if start == b"\x93NUMPY":
            raise CheckpointError(
                f"{path}: a single .npy array, not an .npz archive of a checkpoint's arrays; "
                "download the .npz again"
            )
        if start[:2] != b"PK":
            raise CheckpointError(
                f"{path}: not a readable .npz archive of arrays (not a zip file); download it again"
            )
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.nbytes: dict[str, int] = {}
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._cache: dict[str, np.ndarray] = {}
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise self._error(error) from None
        try:
            members = self._zip.infolist()
            if len(members) > MAX_NPZ_MEMBERS:
                raise CheckpointError(
                    f"{path}: {len(members):,} arrays is more than a checkpoint holds "
                    f"(limit {MAX_NPZ_MEMBERS:,})"
                )
            for member in members:
                if not member.is_dir():
                    self._describe(member)
        except BaseException:
            self._zip.close()
            raise

    def _error(self, error: BaseException) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: not a readable .npz archive of arrays ({library_reason(error)}); "
            "download it again"
        )

    def _describe(self, member: zipfile.ZipInfo) -> None:
        key = (
            member.filename[: -len(".npy")] if member.filename.endswith(".npy") else member.filename
        )
        try:
            with self._zip.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                header_bytes = handle.tell()
        except (
            ValueError,
            OSError,
            EOFError,
            zipfile.BadZipFile,
            RuntimeError,
            NotImplementedError,
        ) as error:
            raise CheckpointError(
                f"{self.path}: array {key!r} is not a readable .npy member "
                f"({library_reason(error)}); download the file again"
            ) from None
        if dtype.hasobject:
            raise CheckpointError(
                f"{self.path}: array {key!r} holds Python objects, which vitcli never unpickles; "
                "a checkpoint holds numbers only"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if header_bytes + nbytes > member.file_size:
            raise CheckpointError(
                f"{self.path}: array {key!r} declares shape {shape} ({nbytes:,} bytes) but the "
                f"archive holds {member.file_size:,} bytes for it; the file is corrupt"
            )
        self.shapes[key] = tuple(int(side) for side in shape)
        self.nbytes[key] = nbytes
        self._members[key] = member

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            member = self._members[key]  # KeyError for an absent key, as a Mapping should
            try:
                with self._zip.open(member) as handle:
                    self._cache[key] = np.lib.format.read_array(handle, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as error:
                raise CheckpointError(
                    f"{self.path}: array {key!r} cannot be read ({library_reason(error)}); "
                    "the file is corrupt, download it again"
                ) from None
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def close(self) -> None:
        self._cache.clear()
        self._zip.close()

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
