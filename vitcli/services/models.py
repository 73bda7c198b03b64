"""`vit info`, `vit convert` and `vit fetch` as library calls: describe, convert and download
checkpoints. The command line only renders what these return."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OptionError
from ..fileio import output_errors
from ..model import describe_family
from ..model.int8 import is_quantized, quantize
from ..weights.format import ModelBundle, save_model
from ..weights.int8 import save_quantized
from ..weights.resolve import as_bundle


def summarize(bundle: ModelBundle) -> dict:
    """Everything `vit info` shows, as plain JSON-able data."""
    config = bundle.config
    return {
        "reference": bundle.reference,
        "source_format": bundle.source_format,
        "name": config.name,
        "family": describe_family(config),
        "config": config.to_dict(),
        "num_parameters": sum(p.numel() for p in bundle.model.parameters()),
        "num_labels": len(bundle.labels),
        "labels": list(bundle.labels),
        "preprocess": bundle.preprocess.to_dict(),
        "extra": bundle.extra,
    }


def describe(model_ref: ModelBundle | str | Path | None) -> dict:
    """What `vit info` shows for a model reference (loaded here)."""
    return summarize(as_bundle(model_ref))


@dataclass(frozen=True)
class Converted:
    path: Path
    name: str  # the architecture's name, or "custom"
    labels: int
    stored: str  # float32 | float16 | int8
    size_bytes: int


def convert_model(
    source: str, destination: str | Path, *, fp16: bool = False, int8: bool = False
) -> Converted:
    """Write any supported checkpoint in our format (atomically), as float32, float16 or int8."""
    destination = Path(destination)
    if destination.suffix.lower() != ".safetensors":
        raise OptionError(f"{destination}: the output must end in .safetensors")
    if destination.is_dir():
        raise OptionError(f"{destination}: is a folder; give a file name ending in .safetensors")
    if fp16 and int8:
        raise OptionError("--fp16 and --int8 are two ways to store the weights: choose one")
    bundle = as_bundle(source)
    source_text = f"{bundle.source_format}: {source}"
    if is_quantized(bundle.model) and not int8:
        raise OptionError(
            f"{source} holds int8 weights; the float ones are gone: add --int8 to copy it, "
            "or convert the float model"
        )
    with output_errors(str(destination)):
        if int8:
            # In place: no second copy of a large model's weights; the file stores what ran.
            bundle.model = quantize(bundle.model, inplace=True)
            save_quantized(bundle, destination, source=source_text)
        else:
            dtype = torch.float16 if fp16 else None
            save_model(bundle, destination, dtype=dtype, source=source_text)
    return Converted(
        path=destination,
        name=bundle.config.name or "custom",
        labels=len(bundle.labels),
        stored="int8" if int8 else "float16" if fp16 else "float32",
        size_bytes=destination.stat().st_size,
    )


def fetch_model(repo_id: str, revision: str | None = None) -> Path:
    """Download a hub model into the Hugging Face cache; returns its snapshot folder."""
    from ..weights.hub import download

    return download(repo_id, revision=revision)
