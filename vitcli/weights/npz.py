"""Original Google ViT checkpoints (.npz from vit_jax and big_vision) -> our model.

Layouts handled:
- vit_jax (the paper's release): `Transformer/encoderblock_{i}/{LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`, `Transformer/posembed_input/
  pos_embedding`, optional `pre_logits` (the 21k files), keys with or without `opt/target/`;
- big_vision: `params/` or `params/img/` prefixes, `{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0}`, top-level `pos_embedding`, blocks optionally scanned into one
  `Transformer/encoderblock/` stack with the layer index as the leading axis, no `cls` when
  pooling is global average.

The JAX code computes GELU with the tanh approximation (flax's `nn.gelu` defaults to
approximate=True), so the model is built with act="gelu_tanh": that, not erf GELU, is what
reproduces the JAX logits. Layer-norm eps is flax's 1e-6.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import Preprocess
from ..errors import CheckpointError, ModelNotFoundError
from ..model import VARIANTS, ViT, ViTConfig
from .format import ModelBundle, default_labels, load_state

KNOWN_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, never unpickling anything."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path}: not a readable .npz archive of arrays ({first}); download it again"
        ) from None


def find_prefix(arrays: dict[str, np.ndarray]) -> str:
    for prefix in KNOWN_PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return prefix
    candidates = sorted(
        key[: -len("embedding/kernel")] for key in arrays if key.endswith("/embedding/kernel")
    )
    if candidates:
        return candidates[0]
    raise CheckpointError(
        "no embedding/kernel array under any prefix: not a Google ViT checkpoint "
        f"(first keys: {', '.join(sorted(arrays)[:4])})"
    )


def _pick(arrays: dict, *names: str) -> str:
    for name in names:
        if name in arrays:
            return name
    return names[0]


def npz_to_timm(arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
    """Google arrays -> (timm-named tensors, facts: prefix, layout, depth, heads, ...)."""
    prefix = find_prefix(arrays)
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        key = prefix + name
        if key not in arrays:
            raise CheckpointError(
                f"missing array {key!r}: the checkpoint is incomplete or of another model"
            )
        used.add(key)
        return np.asarray(arrays[key], dtype=np.float32)

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))

    if any(key.startswith(prefix + "MAPHead") for key in arrays):
        raise CheckpointError(
            "attention-pooling (MAP head) checkpoints are not supported; only CLS or average pooling"
        )
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in arrays
    big_vision = prefix.startswith("params/") or f"{prefix}pos_embedding" in arrays or scanned
    state: dict[str, torch.Tensor] = {}

    kernel = take("embedding/kernel")  # P,P,C,D
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise CheckpointError(f"embedding/kernel has shape {kernel.shape}, expected (P, P, C, D)")
    patch, channels, width = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    state["patch_embed.proj.weight"] = t(kernel.transpose(3, 2, 0, 1))  # P,P,C,D -> D,C,P,P
    state["patch_embed.proj.bias"] = t(take("embedding/bias"))
    class_token = prefix + "cls" in arrays
    if class_token:
        state["cls_token"] = t(take("cls").reshape(1, 1, width))
    pos_name = _pick(
        arrays, prefix + "Transformer/posembed_input/pos_embedding", prefix + "pos_embedding"
    )
    facts: dict = {
        "prefix": prefix,
        "layout": "big_vision" if big_vision else "vit_jax",
        "scanned": scanned,
    }
    if pos_name in arrays:
        pos = take(pos_name[len(prefix) :])
        pos = pos.reshape(1, -1, width)  # 1,T,D
        state["pos_embed"] = t(pos)
        grid_tokens = pos.shape[1] - int(class_token)
        side = math.isqrt(grid_tokens)
        if side * side != grid_tokens:
            raise CheckpointError(
                f"position embedding has {grid_tokens} grid rows, not a square grid"
            )
        facts["pos_embed"] = "learned"
        facts["image_size"] = side * patch
    else:
        facts["pos_embed"] = "sincos2d"  # big_vision's fixed table is computed, never stored
        facts["image_size"] = 224

    if scanned:
        depth = arrays[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        block_names = ["Transformer/encoderblock/"] * depth
    else:
        depth = 0
        while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in arrays:
            depth += 1
        block_names = [f"Transformer/encoderblock_{i}/" for i in range(depth)]
    if depth == 0:
        raise CheckpointError("no Transformer/encoderblock_* arrays: not a ViT checkpoint")
    num_heads = mlp_dim = 0
    qkv_bias = True
    for index, block in enumerate(block_names):
        layer = index if scanned else None

        def get(name: str) -> np.ndarray:
            array = take(block + name)
            return array[layer] if layer is not None else array

        def has(name: str) -> bool:
            return prefix + block + name in arrays

        # vit_jax numbers the sub-modules 0..3 in call order, big_vision per type.
        mha = (
            "MultiHeadDotProductAttention_1/"
            if has("MultiHeadDotProductAttention_1/query/kernel")
            else "MultiHeadDotProductAttention_0/"
        )
        norm2 = "LayerNorm_2/" if has("LayerNorm_2/scale") else "LayerNorm_1/"
        mlp = "MlpBlock_3/" if has("MlpBlock_3/Dense_0/kernel") else "MlpBlock_0/"
        out = f"blocks.{index}."
        state[out + "norm1.weight"] = t(get("LayerNorm_0/scale"))
        state[out + "norm1.bias"] = t(get("LayerNorm_0/bias"))
        query = get(mha + "query/kernel")  # D,nh,Dh
        num_heads = query.shape[1]
        # Each of q, k, v: (D, nh, Dh) -> (D, D) -> transposed to torch's (out, in); stacked q,k,v.
        state[out + "attn.qkv.weight"] = t(
            np.concatenate(
                [
                    get(mha + f"{part}/kernel").reshape(width, width).T
                    for part in ("query", "key", "value")
                ]
            )
        )
        qkv_bias = has(mha + "query/bias")
        if qkv_bias:
            state[out + "attn.qkv.bias"] = t(
                np.concatenate(
                    [
                        get(mha + f"{part}/bias").reshape(-1) for part in ("query", "key", "value")
                    ]  # nh,Dh -> D
                )
            )
        state[out + "attn.proj.weight"] = t(
            get(mha + "out/kernel").reshape(width, width).T
        )  # nh,Dh,D -> D,D
        state[out + "attn.proj.bias"] = t(get(mha + "out/bias"))
        state[out + "norm2.weight"] = t(get(norm2 + "scale"))
        state[out + "norm2.bias"] = t(get(norm2 + "bias"))
        fc1 = get(mlp + "Dense_0/kernel")  # D,M
        mlp_dim = fc1.shape[1]
        state[out + "mlp.fc1.weight"] = t(fc1.T)
        state[out + "mlp.fc1.bias"] = t(get(mlp + "Dense_0/bias"))
        state[out + "mlp.fc2.weight"] = t(get(mlp + "Dense_1/kernel").T)
        state[out + "mlp.fc2.bias"] = t(get(mlp + "Dense_1/bias"))
    state["norm.weight"] = t(take("Transformer/encoder_norm/scale"))
    state["norm.bias"] = t(take("Transformer/encoder_norm/bias"))

    num_classes = 0
    dropped: list[str] = []
    pre_logits = prefix + "pre_logits/kernel" in arrays
    if pre_logits:
        take("pre_logits/kernel")
        take("pre_logits/bias")
        dropped.append("pre_logits (a dense + tanh layer between the encoder and the head)")
    if prefix + "head/kernel" in arrays:
        head_w, head_b = take("head/kernel"), take("head/bias")  # D,K and K
        if pre_logits and (head_w.any() or head_b.any()):
            # Our model has no pre_logits layer, so a head that reads it would give wrong logits.
            dropped.append(f"the {head_w.shape[1]}-class head, which reads pre_logits")
        else:
            num_classes = head_w.shape[1]
            state["head.weight"] = t(head_w.T)
            state["head.bias"] = t(head_b)
            if pre_logits:
                facts["note"] = (
                    f"the {num_classes}-class head is all zeros (as Google released the 21k files): "
                    "logits are 0 until you fine-tune"
                )
    leftovers = sorted(key for key in arrays if key.startswith(prefix) and key not in used)
    if leftovers:
        shown = ", ".join(leftovers[:4]) + (
            f", ... {len(leftovers) - 4} more" if len(leftovers) > 4 else ""
        )
        raise CheckpointError(f"unexpected arrays {shown}: not a plain ViT checkpoint")
    facts.update(
        patch_size=patch,
        in_channels=channels,
        width=width,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
        class_token=class_token,
        qkv_bias=qkv_bias,
        dropped=dropped,
    )
    return state, facts


def variant_name(depth: int, width: int, mlp_dim: int, num_heads: int, patch: int) -> str:
    for name, shape in VARIANTS.items():
        if shape == (depth, width, mlp_dim, num_heads):
            return f"{name}/{patch}"
    return ""


def load_npz(path: str | Path, reference: str = "") -> ModelBundle:
    path = Path(path)
    arrays = read_npz(path)
    try:
        state, facts = npz_to_timm(arrays)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except ValueError as error:  # reshape of an array with the wrong size
        raise CheckpointError(f"{path}: arrays with inconsistent shapes ({error})") from None
    try:
        config = ViTConfig(
            image_size=facts["image_size"],
            patch_size=facts["patch_size"],
            in_channels=facts["in_channels"],
            num_classes=facts["num_classes"],
            width=facts["width"],
            depth=facts["depth"],
            num_heads=facts["num_heads"],
            mlp_dim=facts["mlp_dim"],
            pos_embed=facts["pos_embed"],
            class_token=facts["class_token"],
            pool="cls" if facts["class_token"] else "mean",
            qkv_bias=facts["qkv_bias"],
            ln_eps=1e-6,
            act="gelu_tanh",  # flax nn.gelu is the tanh approximation; erf would drift ~1e-3
            name=variant_name(
                facts["depth"],
                facts["width"],
                facts["mlp_dim"],
                facts["num_heads"],
                facts["patch_size"],
            ),
        )
    except ValueError as error:
        raise CheckpointError(f"{path}: unusable architecture ({error})") from None
    model = ViT(config)
    load_state(model, state, str(path))
    model.eval()
    # The JAX input pipelines squash to the model size (bilinear) and scale to [-1, 1].
    preprocess = Preprocess(
        size=config.image_size,
        resize="squash",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    extra = {key: facts[key] for key in ("prefix", "layout", "scanned")}
    if facts["dropped"]:
        extra["dropped"] = facts["dropped"]
    if "note" in facts:
        extra["note"] = facts["note"]
    if facts["pos_embed"] == "sincos2d":
        extra["preprocess_notes"] = [
            "no stored position table: fixed sincos2d, image size 224 assumed"
        ]
    labels = default_labels(config.num_classes)
    if config.num_classes == 1000:
        from .timm import imagenet1k_labels

        labels = list(imagenet1k_labels())
    return ModelBundle(
        model=model,
        labels=labels,
        preprocess=preprocess,
        source_format="npz",
        reference=reference or str(path),
        extra=extra,
    )
