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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.preprocess import Preprocess
from ..errors import CheckpointError
from ..model import VARIANTS, ViTConfig
from .format import ModelBundle, build_model, default_labels
from .limits import check_config, max_parameters, skeleton
from .readers import NpzArchive

KNOWN_PREFIXES = ("", "opt/target/", "params/", "params/img/")
_CONFIG_FACTS = (
    "image_size",
    "patch_size",
    "in_channels",
    "num_classes",
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "qkv_bias",
)


def read_npz(path: Path) -> NpzArchive:
    """The arrays of an .npz, read lazily after their headers were checked; no pickles."""
    return NpzArchive(path)


def find_prefix(arrays: Mapping[str, Any]) -> str:
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


def describe(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, Any]:
    """ViTConfig fields read from array shapes alone (the .npy headers), before any data.

    Best effort: what is missing gets a harmless default here, and npz_to_timm reports it
    by name when the arrays are read.
    """

    def shape(name: str) -> tuple[int, ...]:
        return tuple(shapes.get(prefix + name, ()))

    kernel = shape("embedding/kernel")  # P,P,C,D
    if len(kernel) != 4:
        raise CheckpointError(f"embedding/kernel has shape {kernel}, expected (P, P, C, D)")
    patch, channels, width = kernel[0], kernel[2], kernel[3]
    class_token = prefix + "cls" in shapes
    pos = shape("Transformer/posembed_input/pos_embedding") or shape("pos_embedding")
    image_size = 224
    if pos and width:
        grid_tokens = math.prod(pos) // width - int(class_token)
        image_size = max(math.isqrt(max(grid_tokens, 0)), 1) * patch
    scanned = shape("Transformer/encoderblock/LayerNorm_0/scale")
    if scanned:
        depth, block = scanned[0], "Transformer/encoderblock/"
    else:
        depth, block = 0, "Transformer/encoderblock_0/"
        while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in shapes:
            depth += 1
    query = shape(block + "MultiHeadDotProductAttention_1/query/kernel") or shape(
        block + "MultiHeadDotProductAttention_0/query/kernel"
    )
    fc1 = shape(block + "MlpBlock_3/Dense_0/kernel") or shape(block + "MlpBlock_0/Dense_0/kernel")
    head = shape("head/kernel")
    return {
        "image_size": image_size,
        "patch_size": patch,
        "in_channels": channels,
        "num_classes": head[-1] if len(head) == 2 else 0,
        "width": width,
        "depth": max(depth, 1),
        "num_heads": query[-2] if len(query) >= 3 else 1,
        "mlp_dim": fc1[-1] if len(fc1) >= 2 else 4 * width,
        "class_token": class_token,
        "pool": "cls" if class_token else "mean",
        "pos_embed": "learned" if pos else "sincos2d",
    }


def check_sizes(archive: NpzArchive, prefix: str, where: str) -> None:
    """Refuse arrays that declare more numbers than the architecture they describe can hold.

    Runs on the .npy headers only, so a small archive that inflates to gigabytes (a deflate
    bomb) or a header declaring 10^12 elements is refused before anything is decompressed.
    """
    declared = sum(
        math.prod(shape) for key, shape in archive.shapes.items() if key.startswith(prefix)
    )
    limit = max_parameters()
    if declared > limit:
        raise CheckpointError(
            f"{where}: the arrays declare {declared:,} numbers, more than vitcli loads "
            f"({limit:,}); set VITCLI_MAX_PARAMETERS to raise the limit"
        )
    fields = check_config(describe(archive.shapes, prefix), where)
    try:
        config = ViTConfig(**fields)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: unusable architecture ({error})") from None
    expected = sum(math.prod(shape) for shape in skeleton(config, where).values())
    width = config.width
    allowance = width * width + width  # a pre_logits layer, which the model drops
    if declared > expected + allowance:
        raise CheckpointError(
            f"{where}: the arrays declare {declared:,} numbers but the architecture they "
            f"describe has {expected:,}; not a plain ViT checkpoint, or corrupt"
        )


def _pick(arrays: Mapping[str, Any], *names: str) -> str:
    for name in names:
        if name in arrays:
            return name
    return names[0]


def npz_to_timm(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
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
            "attention-pooling (MAP head) checkpoints are not supported; "
            "only CLS or average pooling"
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

        def get(name: str, block: str = block, layer: int | None = layer) -> np.ndarray:
            array = take(block + name)
            return array[layer] if layer is not None else array

        def has(name: str, block: str = block) -> bool:
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
                    f"the {num_classes}-class head is all zeros (as Google released the 21k "
                    "files): logits are 0 until you fine-tune"
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
    where = str(path)
    with read_npz(path) as archive:
        try:
            check_sizes(archive, find_prefix(archive.shapes), where)
            state, facts = npz_to_timm(archive)
        except CheckpointError as error:
            message = str(error)
            raise CheckpointError(
                message if message.startswith(where) else f"{where}: {message}"
            ) from None
        except ValueError as error:  # reshape of an array with the wrong size
            raise CheckpointError(f"{where}: arrays with inconsistent shapes ({error})") from None
    fields = check_config({key: facts[key] for key in _CONFIG_FACTS}, where)
    try:
        config = ViTConfig(
            **fields,
            pos_embed=facts["pos_embed"],
            class_token=facts["class_token"],
            pool="cls" if facts["class_token"] else "mean",
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
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: unusable architecture ({error})") from None
    model = build_model(config, state, where)
    # The JAX input pipelines squash to the model size (bilinear) and scale to [-1, 1].
    preprocess = Preprocess(
        size=config.image_size,
        resize="squash",
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        origins={
            "recipe": "vit_jax / big_vision eval (squash, [-1, 1]); their tf.image.resize is "
            "read as PIL bilinear, as transformers' port of these checkpoints does"
        },
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
