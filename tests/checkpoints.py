"""Checkpoint builders shared by the loader and CLI tests: tiny random ViTs, our model in
Google's .npz layout, and a Hugging Face cache populated by hand (no network)."""

from __future__ import annotations

import hashlib
import json
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitcli.errors import CheckpointError, VitError
from vitcli.model import ViT, ViTConfig
from vitcli.weights.resolve import load_model

TINY = dict(image_size=32, patch_size=8, num_classes=5, width=32, depth=2, num_heads=4, mlp_dim=64)
TINY_LABELS = ["cat", "dog", "bird", "fish", "frog"]
# Library advice to load unsafely, which our error messages must never pass on.
UNSAFE_ADVICE = ("weights_only", "allow_pickle", "trust")
savez = cast(Any, np.savez)  # numpy's stubs take **arrays for its own keyword arguments


def randomise_hf(model, seed: int = 0):
    """A transformers model with every parameter drawn from N(0, 0.2), position tables from
    N(0, 1) (5x larger: a wrong resampling rule then shows far above the tests' tolerance)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 1.0 if "position" in name else 0.2)
    return model.eval()


def tiny_config(**overrides: Any) -> ViTConfig:
    """A tiny ViTConfig (32x32, patch 8, width 32, depth 2, 4 heads, 5 classes) with overrides."""
    return ViTConfig(**{**TINY, **overrides})


def randomised(config: ViTConfig, seed: int = 0, std: float = 0.2) -> ViT:
    """The ViT of `config` with every parameter drawn from N(0, std) (attention far from
    uniform), in eval mode."""
    torch.manual_seed(seed)
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def random_vit(seed: int = 0, std: float = 0.2, **overrides: Any) -> ViT:
    """A tiny random ViT of `tiny_config(**overrides)`."""
    return randomised(tiny_config(**overrides), seed=seed, std=std)


def to_google(
    model,
    prefix: str = "",
    big_vision: bool = False,
    scanned: bool = False,
    pre_logits: str | None = None,
) -> dict[str, np.ndarray]:
    """Our model in Google's layout: every transform of REFERENCE.md run backwards."""
    config = model.config
    width, heads, head_dim = config.width, config.num_heads, config.head_dim
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    out["embedding/kernel"] = sd["patch_embed.proj.weight"].transpose(
        2, 3, 1, 0
    )  # D,C,P,P -> P,P,C,D
    out["embedding/bias"] = sd["patch_embed.proj.bias"]
    if config.class_token:
        out["cls"] = sd["cls_token"]
    out["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = sd[
        "pos_embed"
    ]
    mha, norm2, mlp = (
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
        if big_vision
        else ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    )
    blocks = []
    for i in range(config.depth):
        b = f"blocks.{i}."
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        block = {
            "LayerNorm_0/scale": sd[b + "norm1.weight"],
            "LayerNorm_0/bias": sd[b + "norm1.bias"],
            f"{norm2}/scale": sd[b + "norm2.weight"],
            f"{norm2}/bias": sd[b + "norm2.bias"],
            f"{mha}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, head_dim, width),
            f"{mha}/out/bias": sd[b + "attn.proj.bias"],
            f"{mlp}/Dense_0/kernel": sd[b + "mlp.fc1.weight"].T,
            f"{mlp}/Dense_0/bias": sd[b + "mlp.fc1.bias"],
            f"{mlp}/Dense_1/kernel": sd[b + "mlp.fc2.weight"].T,
            f"{mlp}/Dense_1/bias": sd[b + "mlp.fc2.bias"],
        }
        for part, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            block[f"{mha}/{part}/kernel"] = w.T.reshape(width, heads, head_dim)
            block[f"{mha}/{part}/bias"] = bias.reshape(heads, head_dim)
        blocks.append(block)
    if scanned:  # big_vision's scan: one stack per array, layer index first
        for name in blocks[0]:
            out[f"Transformer/encoderblock/{name}"] = np.stack([block[name] for block in blocks])
    else:
        for i, block in enumerate(blocks):
            out.update(
                {f"Transformer/encoderblock_{i}/{name}": array for name, array in block.items()}
            )
    out["Transformer/encoder_norm/scale"] = sd["norm.weight"]
    out["Transformer/encoder_norm/bias"] = sd["norm.bias"]
    if pre_logits:
        rng = np.random.default_rng(0)
        out["pre_logits/kernel"] = rng.normal(0, 0.2, (width, width)).astype(np.float32)
        out["pre_logits/bias"] = rng.normal(0, 0.2, width).astype(np.float32)
    if config.num_classes:
        out["head/kernel"] = sd["head.weight"].T
        out["head/bias"] = sd["head.bias"]
        if pre_logits == "zero-head":  # as Google released the 21k files
            out["head/kernel"] = np.zeros_like(out["head/kernel"])
            out["head/bias"] = np.zeros_like(out["head/bias"])
    return {prefix + name: array for name, array in out.items()}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    savez(path, **arrays)
    return path


def populate_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshot links, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# -- hostile checkpoints -------------------------------------------------------------------
def forbid_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make building a real (allocating) ViT fail: refusals must come before it."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ViT(...) was built before the checkpoint was refused")

    monkeypatch.setattr("vitcli.weights.format.ViT", refuse)


def refused(reference, *fragments: str) -> str:
    """load_model(reference) raises one CheckpointError line holding every fragment."""
    with pytest.raises(VitError) as caught:
        load_model(str(reference))
    message = str(caught.value)
    assert isinstance(caught.value, CheckpointError), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    for advice in UNSAFE_ADVICE:
        assert advice not in message, message
    return message


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def rewrite(source: Path, target: Path, **changes) -> Path:
    """`source` (our format) with metadata entries replaced: a dict for config/preprocess is
    merged into the stored fields, a string replaces the entry's text."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    for key in ("config", "preprocess"):
        if isinstance(changes.get(key), dict):
            data = json.loads(metadata[key])
            data.update(changes.pop(key))
            metadata[key] = json.dumps(data)
    metadata.update(changes)
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


def hf_folder(folder: Path, **config) -> Path:
    """A tiny transformers ViT folder written by hand (no transformers needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    width, mlp, classes = 32, 64, 3
    tensors = {
        "vit.embeddings.cls_token": torch.zeros(1, 1, width),
        "vit.embeddings.position_embeddings": torch.zeros(1, 17, width),
        "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(width, 3, 8, 8),
        "vit.embeddings.patch_embeddings.projection.bias": torch.zeros(width),
        "vit.layernorm.weight": torch.ones(width),
        "vit.layernorm.bias": torch.zeros(width),
        "classifier.weight": torch.zeros(classes, width),
        "classifier.bias": torch.zeros(classes),
    }
    block = "vit.encoder.layer.0."
    for part in ("query", "key", "value"):
        tensors[f"{block}attention.attention.{part}.weight"] = torch.zeros(width, width)
        tensors[f"{block}attention.attention.{part}.bias"] = torch.zeros(width)
    for name, shape in {
        "attention.output.dense": (width, width),
        "intermediate.dense": (mlp, width),
        "output.dense": (width, mlp),
    }.items():
        tensors[f"{block}{name}.weight"] = torch.zeros(shape)
        tensors[f"{block}{name}.bias"] = torch.zeros(shape[0])
    for norm in ("layernorm_before", "layernorm_after"):
        tensors[f"{block}{norm}.weight"] = torch.ones(width)
        tensors[f"{block}{norm}.bias"] = torch.zeros(width)
    save_file(tensors, str(folder / "model.safetensors"))
    settings = dict(
        model_type="vit",
        hidden_size=width,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=mlp,
        image_size=32,
        patch_size=8,
        id2label={"0": "a", "1": "b", "2": "c"},
    )
    settings.update(config)
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


def timm_folder(folder: Path, tiny_model, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tiny_model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    settings: dict = dict(
        architecture="vit_tiny_patch16_224",
        num_classes=5,
        model_args=dict(
            embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=8, img_size=32
        ),
    )
    settings.update(config)
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


def bin_folder(tmp_path: Path, save: Callable[[dict, Path], object]) -> Path:
    folder = hf_folder(tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    save(tensors, folder / "pytorch_model.bin")
    return folder


def colour_folder(root: Path, per_class: int = 4, size: int = 32) -> Path:
    """A labelled folder to train on: red/, green/, blue/, each image one bright square of
    its class's colour channel on dark noise (a tiny model learns it in a few steps)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for channel, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, channel] = 230
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
