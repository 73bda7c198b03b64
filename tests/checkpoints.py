"""Checkpoint builders shared by the loader and CLI tests: tiny random ViTs, our model in
Google's .npz layout, and a Hugging Face cache populated by hand (no network)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from vitcli.model import ViT, ViTConfig

TINY = dict(image_size=32, patch_size=8, num_classes=5, width=32, depth=2, num_heads=4, mlp_dim=64)
TINY_LABELS = ["cat", "dog", "bird", "fish", "frog"]


def random_vit(seed: int = 0, std: float = 0.2, **overrides: Any) -> ViT:
    """A tiny ViT (32x32, patch 8, width 32, depth 2, 4 heads, 5 classes) with overrides and
    every parameter drawn from N(0, std), in eval mode."""
    torch.manual_seed(seed)
    model = ViT(ViTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


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
    cast(Any, np.savez)(path, **arrays)  # numpy's stubs read **arrays as its keywords
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
