"""A checkpoint's preprocessing read from its small files, before torch is imported.

`vit predict` and `vit embed` start decoding images while torch is still being imported and
the model loaded (services/early.py): importing torch takes a core for over a second, and the
other core can decode most of a 64-photo folder in that time. For that they need to know how
each image will be resized before the checkpoint is loaded, and this module tells it from a
safetensors header (vitcli files, the bundled model, `vit train` run folders) or from
config.json and preprocessor_config.json (transformers and timm folders), through the same
recipe readers the loaders use (recipes.py). Reading a weight, or torch, is never needed.

It is a forecast, not a second resolution: `peek_preprocess` answers None wherever it cannot
tell cheaply (a hub id, an .npz, a raw .pth, OpenCLIP, anything malformed, which the real load
then reports), and whoever uses the answer compares it with the loaded bundle's `preprocess`
and throws the early work away when they differ (data/decoders.py `EarlyDecoding`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.preprocess import Preprocess
from ..errors import VitError
from .files import read_json, safetensors_metadata
from .locate import BUNDLED_NAMES, default_model_path, path_kind, run_folder_model
from .recipes import preprocess_from_hf, preprocess_from_timm


def peek_preprocess(reference: str | Path | None) -> Preprocess | None:
    """The preprocessing `resolve.load_model(reference)` will most likely give, or None."""
    try:
        return _peek(reference)
    except (VitError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _peek(reference: str | Path | None) -> Preprocess | None:
    if reference is None and os.environ.get("VIT_MODEL", "").strip():
        return _peek(os.environ["VIT_MODEL"].strip())
    if reference is None or str(reference) in ("", *BUNDLED_NAMES):
        return _from_file(default_model_path())
    path = Path(str(reference)).expanduser()
    kind = path_kind(path)
    if kind == "file":
        return _from_file(path)
    if kind == "folder":
        return _from_folder(path)
    return None  # a hub id, a family:FILE name, or nothing there


def _from_file(path: Path) -> Preprocess | None:
    if path.suffix.lower() != ".safetensors" or path.name.startswith("open_clip_"):
        return None
    metadata = safetensors_metadata(path)
    if metadata.get("format") == "vitcli":
        recipe = metadata.get("preprocess")
        return Preprocess.from_dict(json.loads(recipe)) if recipe else None
    if (path.parent / "config.json").is_file():
        return _from_folder(path.parent)
    return None


def _from_folder(path: Path) -> Preprocess | None:
    run = run_folder_model(path)
    if run is not None:
        return _from_file(run[0])
    config_path = path / "config.json"
    if not config_path.is_file():
        if any(path.glob("open_clip_*")):
            return None
        ours = sorted(path.glob("*.safetensors"))
        return _from_file(ours[0]) if len(ours) == 1 else None
    config = read_json(config_path)
    if not isinstance(config, dict):
        return None
    if "architecture" in config or "pretrained_cfg" in config:  # a timm folder
        pretrained = config.get("pretrained_cfg") or {}
        args = config.get("model_args") or {}
        size = _size(args.get("img_size") or pretrained.get("input_size"))
        if size is None:
            return None
        return preprocess_from_timm(pretrained, size, f"{config_path} pretrained_cfg")[0]
    vision = config.get("vision_config")
    size = _size((vision if isinstance(vision, dict) else config).get("image_size", 224))
    return preprocess_from_hf(path, size)[0] if size is not None else None


def _size(value: object) -> tuple[int, int] | None:
    """An image size as configs write it: 224, [224, 224] or timm's input_size [3, 224, 224]."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) in (2, 3):
        height, width = value[-2:]
        if isinstance(height, int) and isinstance(width, int):
            return height, width
    return None
