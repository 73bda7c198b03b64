"""Our weight format: one .safetensors file, timm tensor names, everything else in metadata.

Metadata (all strings, as safetensors requires):
  format            "vitcli"
  format_version    "1"
  config            ViTConfig as JSON
  labels            JSON list of class names, index order
  preprocess        Preprocess as JSON
  source            where the weights came from (free text, shown by `vit info`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.preprocess import Preprocess
from ..errors import CheckpointError, ModelNotFoundError
from ..fileio import atomic_write_bytes
from ..model import ViT, ViTConfig

FORMAT_NAME = "vitcli"
FORMAT_VERSION = 1


@dataclass
class ModelBundle:
    """A model with what is needed to use it: labels, preprocessing, provenance."""

    model: ViT
    labels: list[str]
    preprocess: Preprocess
    source_format: str = "vitcli"  # vitcli | hf | timm | npz
    reference: str = ""  # what the user passed to --model
    extra: dict = field(default_factory=dict)  # e.g. dropped pre_logits, hub revision

    @property
    def config(self) -> ViTConfig:
        return self.model.config


def default_labels(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def save_model(
    model: ViT | ModelBundle,
    path: str | Path,
    labels: list[str] | None = None,
    preprocess: Preprocess | None = None,
    dtype: torch.dtype | None = None,
    source: str = "",
) -> Path:
    """Save in our format, atomically. `dtype=torch.float16` halves the file size."""
    from safetensors.torch import save

    if isinstance(model, ModelBundle):
        labels = labels if labels is not None else model.labels
        preprocess = preprocess or model.preprocess
        source = source or model.reference or model.source_format
        model = model.model
    config = model.config
    labels = list(labels) if labels is not None else default_labels(config.num_classes)
    if len(labels) != config.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {config.num_classes} classes")
    preprocess = preprocess or Preprocess(size=config.image_size)
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "labels": json.dumps(labels, ensure_ascii=False),
        "preprocess": preprocess.to_json(),
        "source": source,
    }
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, with a clear error for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if data[:2] == b"\x80\x02" or data[:2] == b"PK":
        raise CheckpointError(
            f"{path}: this is a pickle/zip (torch.save) file, not safetensors; "
            "rename it to .bin inside its model folder, or convert it with `vit convert`"
        )
    try:
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({error}); the file may be truncated or corrupt, download or convert it again"
        ) from None
    return tensors, metadata


def load_state(model: ViT, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model`, failing with a message that names bad keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_sample(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_sample(unexpected)})")
        raise CheckpointError(
            f"{where}: weights do not match the architecture: " + "; ".join(parts)
        )
    wrong = [
        f"{name} is {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if tuple(state[name].shape) != tuple(tensor.shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{where}: wrong tensor shapes: "
            + "; ".join(wrong[:3])
            + (" ..." if len(wrong) > 3 else "")
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _sample(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def is_vitcli_file(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT_NAME


def load_vitcli_file(path: str | Path, reference: str = "") -> ModelBundle:
    tensors, metadata = read_safetensors(path)
    if not is_vitcli_file(metadata):
        raise CheckpointError(
            f"{path}: a safetensors file without vitcli metadata; pass its model folder "
            "(with config.json) instead, or convert it with `vit convert`"
        )
    try:
        version = int(metadata.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: written by a newer vitcli (format {version}); upgrade vitcli"
            )
        config = ViTConfig.from_json(metadata["config"])
        labels = json.loads(metadata.get("labels", "null")) or default_labels(config.num_classes)
        preprocess = (
            Preprocess.from_dict(json.loads(metadata["preprocess"]))
            if "preprocess" in metadata
            else Preprocess(size=config.image_size)
        )
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: broken vitcli metadata ({error}); re-save or re-convert the file"
        ) from None
    if len(labels) != config.num_classes:
        raise CheckpointError(f"{path}: {len(labels)} labels for {config.num_classes} classes")
    model = ViT(config)
    load_state(model, tensors, str(path))
    model.eval()
    return ModelBundle(
        model=model,
        labels=list(labels),
        preprocess=preprocess,
        source_format="vitcli",
        reference=reference or str(path),
        extra={"source": metadata.get("source", "")},
    )
