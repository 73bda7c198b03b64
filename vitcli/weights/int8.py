"""int8 model files: our safetensors format with the quantised Linear layers stored as computed.

Same tensor names as a float file (timm's), except that each quantised layer's `weight` is int8
(out, in) and a `weight_scale` (out,) float32 sits beside it; every other tensor is float.
The metadata is a float file's plus `quantization` (vitcli.model.int8.QUANTIZATION), so a run
loads the weights ready to use instead of quantising again (`vit convert --int8`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.preprocess import Preprocess
from ..errors import CheckpointError
from ..fileio import atomic_write_bytes
from ..model import ViTConfig
from ..model.int8 import QUANTIZATION, is_quantized, quantize, quantized_skeleton
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ModelBundle,
    default_labels,
    is_vitcli_file,
    read_safetensors,
)
from .limits import check_config, skeleton, uninitialised


def is_quantized_file(metadata: dict[str, str]) -> bool:
    """True for a file written by `save_quantized` (any version of the scheme)."""
    return is_vitcli_file(metadata) and bool(metadata.get("quantization"))


def save_quantized(bundle: ModelBundle, path: str | Path, source: str = "") -> Path:
    """Write `bundle` as an int8 file, atomically; a float model is quantised first (on a copy)."""
    from safetensors.torch import save

    model = bundle.model if is_quantized(bundle.model) else quantize(bundle.model.to("cpu"))
    config = model.config
    labels = list(bundle.labels) or default_labels(config.num_classes)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "labels": json.dumps(labels, ensure_ascii=False),
        "preprocess": bundle.preprocess.to_json(),
        "source": source or bundle.reference or bundle.source_format,
        "quantization": QUANTIZATION,
    }
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_quantized(path: str | Path, reference: str = "") -> ModelBundle:
    """An int8 file back as a ready ModelBundle (CPU, eval mode), without re-quantising."""
    tensors, metadata = read_safetensors(path)
    if not is_quantized_file(metadata):
        raise CheckpointError(f"{path}: not a vitcli int8 file; load it as a float model")
    scheme = metadata["quantization"]
    if scheme != QUANTIZATION:
        raise CheckpointError(
            f"{path}: int8 scheme {scheme!r} is not this vitcli's {QUANTIZATION!r}; "
            "convert the float model again with `vit convert --int8`"
        )
    where = str(path)
    try:
        # The config held to a float file's limits before anything is built.
        config = ViTConfig.from_dict(check_config(json.loads(metadata["config"]), where))
        labels = json.loads(metadata.get("labels", "null")) or default_labels(config.num_classes)
        preprocess = Preprocess.from_dict(json.loads(metadata["preprocess"]))
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise CheckpointError(f"{path}: broken vitcli metadata ({error}); convert again") from None
    skeleton(config, where)  # the parameter limit
    # assign=True below adopts the file's tensors without a copy.
    model = quantized_skeleton(uninitialised(config))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [
        name
        for name in set(expected) & set(tensors)
        if expected[name].shape != tensors[name].shape
        or expected[name].dtype != tensors[name].dtype
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: int8 tensors do not match the architecture (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape or dtype {sorted(wrong)[:3]}); "
            "convert again"
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return ModelBundle(
        model=model,
        labels=list(labels),
        preprocess=preprocess,
        source_format="vitcli",
        reference=reference or str(path),
        extra={"source": metadata.get("source", ""), "quantization": scheme},
    )
