"""`--model REF` resolution: our file, an HF or timm folder, a `vit train` run folder (its
best model), a Google .npz, a hub id, or the bundled default model (no reference, or one of
BUNDLED_NAMES)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError, VitError
from .files import read_json
from .format import ModelBundle, load_vitcli_file
from .locate import (
    BUNDLED_NAME,
    BUNDLED_NAMES,
    HUB_ID,
    RUN_LAST,
    RUN_STATE,
    default_model_path,
    is_run_folder,
    named_family,
    path_kind,
    run_folder_model,
)
from .readers import read_safetensors
from .stamp import stamp

# Shown by `vit info` instead of the file's own free-text source, which names a path on the
# machine that trained it.
BUNDLED_SOURCE = "bundled with vitcli (six synthetic shapes; recipe in weights/README.md)"


def load_model(reference: str | Path | None = None) -> ModelBundle:
    """Load any supported checkpoint; the architecture and preprocessing come from it.

    None means the user's default: the VIT_MODEL environment variable when set, else the
    bundled model (`bundled` always names the bundled one). The bundle is stamped with its
    source (weights/stamp.py), which caches use as a cheap key."""
    bundle, source = _load(reference)
    if bundle.stamp is None and source is not None:
        bundle.stamp = stamp(source, bundle.model)
    return bundle


def _load(reference: str | Path | None) -> tuple[ModelBundle, Path | None]:
    if reference is None and os.environ.get("VIT_MODEL", "").strip():
        try:
            return load_model(os.environ["VIT_MODEL"].strip()), None
        except VitError as error:
            raise type(error)(
                f"{error} (the model named by VIT_MODEL; unset it or fix it)"
            ) from None
    if reference is None or str(reference) in ("", *BUNDLED_NAMES):
        return load_bundled(), None
    text = str(reference)
    path = Path(text).expanduser()
    kind = path_kind(path)
    named = named_family(text) if kind == "missing" else None
    if named is not None:
        from .originals import load_raw_pth

        family, arch, file = named
        if path_kind(Path(file).expanduser()) != "file":
            raise ModelNotFoundError(f"{file}: no such file (named by --model {text})")
        return load_raw_pth(Path(file).expanduser(), text, family=family, arch=arch), Path(
            file
        ).expanduser()
    if kind == "file":
        return _load_file(path, text), path
    if kind == "folder":
        return _load_folder(path, text), path
    if kind == "other":
        raise CheckpointError(
            f"{text}: not a regular file or folder (a FIFO, device or socket is never read); "
            "pass a model file or folder"
        )
    looks_like_file = path.suffix.lower() in (".safetensors", ".npz", ".bin", ".pt", ".pth")
    if HUB_ID.match(text) and not looks_like_file and not path.parent.is_dir():
        from .hub import download

        folder = download(text)
        return _load_folder(folder, text), folder
    raise ModelNotFoundError(
        f"{text}: no such file or folder; pass a .safetensors/.npz file, a model folder, "
        f"a hub id such as google/vit-base-patch16-224, or {BUNDLED_NAME} (the bundled model)"
    )


def as_bundle(model: ModelBundle | str | Path | None) -> ModelBundle:
    """A service's `model` argument: a loaded bundle as it is, anything else through
    `load_model` (so the commands pass what the user typed, and the service loads it)."""
    return model if isinstance(model, ModelBundle) else load_model(model)


def load_bundled() -> ModelBundle:
    """The bundled model, named so users can type it, without its build machine's paths."""
    path = default_model_path()
    bundle = load_vitcli_file(path, reference=BUNDLED_NAME)
    bundle.stamp = stamp(path, bundle.model)
    bundle.extra["source"] = BUNDLED_SOURCE
    bundle.extra["bundled"] = True
    return bundle


def _load_file(path: Path, reference: str) -> ModelBundle:
    suffix = path.suffix.lower()
    if path.name == RUN_STATE and is_run_folder(path.parent):
        run = path.parent
        raise CheckpointError(
            f"{path}: the training state of a `vit train` run (for --resume), not a model; "
            f"pass the run folder {run} (its best model) or {run / RUN_LAST} (the last epoch)"
        )
    if suffix == ".npz":
        from .npz import load_npz

        return load_npz(path, reference=reference)
    if path.name.startswith("open_clip_"):
        from .originals import load_openclip

        return load_openclip(path, reference=reference)
    if suffix == ".safetensors":
        _, metadata = read_safetensors(path, meta=True)  # the header only
        if metadata.get("format") == "vitcli" and metadata.get("quantization"):
            return _load_int8_file(path, reference, metadata)  # `vit convert --int8`
        if metadata.get("format") == "vitcli":
            return load_vitcli_file(path, reference=reference)
        if (path.parent / "config.json").exists():
            return _load_folder(path.parent, reference)
        raise CheckpointError(
            f"{path}: a safetensors file without vitcli metadata and no config.json beside it; "
            "pass its model folder (with config.json) instead"
        )
    if suffix in (".bin", ".pt", ".pth"):
        if (path.parent / "config.json").exists():
            return _load_folder(path.parent, reference)
        from .originals import load_raw_pth  # identified from evidence, else a clear error

        return load_raw_pth(path, reference=reference)
    raise CheckpointError(
        f"{path}: unknown checkpoint type {suffix or '(no extension)'}; "
        "use .safetensors, .npz or a model folder"
    )


def _load_folder(path: Path, reference: str) -> ModelBundle:
    run = run_folder_model(path)
    if run is not None:
        bundle = _load_file(run[0], reference)
        bundle.extra["run_model"] = run[1]
        return bundle
    config_path = path / "config.json"
    openclip = sorted(path.glob("open_clip_*model.safetensors")) or sorted(
        path.glob("open_clip_*.bin")
    )
    if not config_path.exists() and openclip:
        return _load_file(openclip[0], reference)
    if not config_path.exists():
        ours = sorted(path.glob("*.safetensors"))
        if len(ours) == 1:
            return _load_file(ours[0], reference)
        raise ModelNotFoundError(
            f"{path}: no config.json in this folder; pass a model folder or a weights file"
        )
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, not {type(config).__name__}")
    if "architecture" in config or "pretrained_cfg" in config:
        from .timm_families import load_timm

        return load_timm(path, config, reference=reference)
    from .hf_families import load_hf

    return load_hf(path, config, reference=reference)


def _load_int8_file(path: Path, reference: str, metadata: dict[str, str]) -> ModelBundle:
    """An int8 file (`vit convert --int8`): its loader holds the config to a float file's
    limits before anything is built."""
    from .int8 import load_quantized

    return load_quantized(path, reference=reference)
