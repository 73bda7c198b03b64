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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.preprocess import Preprocess
from ..errors import CheckpointError, VitError
from ..fileio import atomic_write_bytes
from ..model import ViT, ViTConfig
from .files import library_reason
from .limits import check_config, check_state, skeleton, uninitialised
from .readers import read_safetensors
from .stamp import SourceStamp

__all__ = [
    "ModelBundle",
    "build_model",
    "default_labels",
    "load_state",
    "load_vitcli_file",
    "save_model",
]

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
    # Set by load_model: what identifies the source of the weights, cheaply (weights/stamp.py).
    stamp: SourceStamp | None = field(default=None, repr=False, compare=False)

    @property
    def config(self) -> ViTConfig:
        return self.model.config

    def describe(self) -> str:
        """One line naming the model for summaries: what the user typed, and for the bundled
        model what it knows (six shapes, not photos), so nobody mistakes its guesses."""
        name = self.reference or self.source_format
        classes = self.config.num_classes
        if self.extra.get("bundled"):
            return f"{name} (bundled; knows {', '.join(self.labels)})"
        return f"{name} ({classes} classes)" if classes else f"{name} (no classifier head)"


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


def load_state(model: ViT, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model`, failing with a message that names bad keys and shapes."""
    expected = model.state_dict()
    check_state({name: tensor.shape for name, tensor in expected.items()}, state, where)
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def build_model(
    config: ViTConfig,
    state: Mapping[str, torch.Tensor],
    where: str,
    read: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> ViT:
    """The model of `config` with `state` loaded, in eval mode; every check comes first.

    `state` may hold meta tensors (shapes read from a file's header): then `read` returns the
    real tensors, and is only called once the config is within limits and every name and
    shape matches the architecture (see limits.py).
    """
    check_state(skeleton(config, where), state, where)
    if read is not None:
        state = read()
    try:
        model = uninitialised(config)
    except ValueError as error:  # a family flag combination the model refuses
        raise CheckpointError(f"{where}: unusable architecture ({error})") from None
    load_state(model, state, where)
    return model.eval()


def checkpoint_bundle(
    model: ViT,
    labels: list[str],
    preprocess: Preprocess,
    source_format: str,
    reference: str,
    extra: dict,
    notes: list[str] | None = None,
    features_only: str | None = None,
) -> ModelBundle:
    """The ModelBundle a home's loader returns: `extra` without its empty values, the
    preprocessing notes, and `features_only` as the note of a model without a classifier."""
    extra = {key: value for key, value in extra.items() if value not in (None, "", [], ())}
    if notes:
        extra["preprocess_notes"] = list(notes)
    if features_only:
        extra["note"] = features_only
    return ModelBundle(
        model=model,
        labels=labels,
        preprocess=preprocess,
        source_format=source_format,
        reference=reference,
        extra=extra,
    )


FEATURES_ONLY = "no classifier in this checkpoint: embeddings and attention maps only"


def is_vitcli_file(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT_NAME


def load_vitcli_file(path: str | Path, reference: str = "") -> ModelBundle:
    path = Path(path)
    where = str(path)
    tensors, metadata = read_safetensors(path, meta=True)  # header only
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
        fields = check_config(json.loads(metadata["config"]), where)
        config = ViTConfig.from_dict(fields)
        labels = check_labels(json.loads(metadata.get("labels", "null")), config.num_classes, where)
        preprocess = (
            Preprocess.from_dict(json.loads(metadata["preprocess"]))
            if "preprocess" in metadata
            else Preprocess(size=config.image_size)
        )
    except VitError as error:
        message = str(error)
        raise CheckpointError(
            message if message.startswith(where) else f"{where}: {message}"
        ) from None
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise CheckpointError(
            f"{path}: broken vitcli metadata ({library_reason(error)}); "
            "re-save or re-convert the file"
        ) from None
    model = build_model(config, tensors, where, read=lambda: read_safetensors(path)[0])
    return ModelBundle(
        model=model,
        labels=labels,
        preprocess=preprocess,
        source_format="vitcli",
        reference=reference or str(path),
        extra={"source": metadata.get("source", "")},
    )


def check_labels(labels: object, num_classes: int, where: str) -> list[str]:
    """Class names as stored (a JSON list of strings, one per class); None: generic names."""
    if labels is None:
        return default_labels(num_classes)
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise CheckpointError(f"{where}: labels must be a list of class names (strings)")
    if len(labels) != num_classes:
        raise CheckpointError(f"{where}: {len(labels)} labels for {num_classes} classes")
    return list(labels)
