"""Bounds on what a checkpoint may ask for, checked before anything is allocated.

A checkpoint's config is data from a stranger: `width: 1000000000` or `depth: 1000000` would
make `ViT(config)` allocate gigabytes before any shape check could fail. So every loader
(our format, HF and timm folders, Google .npz) runs the same three steps:

1. `check_config` on the raw fields: types, ranges, divisibility; one error naming the field.
2. `skeleton`: the model built on the meta device (shapes only, no memory), its size checked
   against `max_parameters()`.
3. `check_state`: the checkpoint's tensors, known from file headers only (meta tensors),
   compared name by name and shape by shape with the skeleton.

Only then are tensor bytes read and the real model built (`format.build_model`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from .. import runtime
from ..errors import CheckpointError
from ..model import ViT, ViTConfig

MAX_WIDTH = 8192  # ViT-22B is 6144
MAX_DEPTH = 256  # ViT-22B is 48
MAX_MLP_DIM = 65536
MAX_CHANNELS = 64
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,843
MAX_IMAGE_SIDE = runtime.MAX_IMAGE_SIDE
MAX_REG_TOKENS = 256  # published register models use 4 to 16
# ViT-G/14 has 1.8 billion parameters; more than this is refused unless the user raises it.
DEFAULT_MAX_PARAMETERS = 2_000_000_000
MAX_PARAMETERS_ENV = "VITCLI_MAX_PARAMETERS"

# field -> (lowest, highest) for the integer fields of ViTConfig.
INT_RANGES: dict[str, tuple[int, int]] = {
    "patch_size": (1, MAX_IMAGE_SIDE),
    "in_channels": (1, MAX_CHANNELS),
    "num_classes": (0, MAX_CLASSES),
    "width": (1, MAX_WIDTH),
    "depth": (1, MAX_DEPTH),
    "num_heads": (1, MAX_WIDTH),
    "mlp_dim": (1, MAX_MLP_DIM),
    "reg_tokens": (0, MAX_REG_TOKENS),
}
RATE_FIELDS = ("dropout", "attn_dropout", "drop_path")
BOOL_FIELDS = (
    "class_token",
    "qkv_bias",
    "dist_token",
    "no_embed_class",
    "pre_norm",
    "patch_bias",
    "fc_norm",
)
TEXT_FIELDS = ("pos_embed", "pool", "act", "name", "head_kind", "pos_resample", "family")


def max_parameters() -> int:
    """The largest model vitcli builds: 2e9 numbers, or VITCLI_MAX_PARAMETERS."""
    text = os.environ.get(MAX_PARAMETERS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PARAMETERS
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        raise CheckpointError(
            f"{MAX_PARAMETERS_ENV}={text!r} is not a number; set it to a parameter count"
        ) from None
    if value < 1:
        raise CheckpointError(f"{MAX_PARAMETERS_ENV}={text!r} must be a positive count")
    return value


def whole(value: Any, name: str, where: str) -> int:
    """An integer field given as int or integral float (JSON has one number type)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value, ok = int(value), True
    if not ok:
        raise CheckpointError(f"{where}: config field {name} = {value!r} is not a whole number")
    return int(value)


def check_config(
    config: ViTConfig | Mapping[str, Any],
    where: str,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Refuse a config (a ViTConfig or its raw fields) that is malformed or absurdly large.

    Fields absent from a mapping are not checked (the loader's defaults apply). `names` maps
    our field names to the file's (width -> hidden_size) so that errors name what the user
    sees. Returns the fields with whole numbers as int and image_size as a pair, ready for
    ViTConfig(**fields).
    """
    names = names or {}

    def field(name: str) -> str:
        return f"config field {names.get(name, name)}"

    if isinstance(config, ViTConfig):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: the model config is not a JSON object")
    fields = dict(config)
    for name, (low, high) in INT_RANGES.items():
        if name in fields:
            value = whole(fields[name], names.get(name, name), where)
            if not low <= value <= high:
                raise CheckpointError(
                    f"{where}: {field(name)} = {value} is out of range ({low}..{high})"
                )
            fields[name] = value
    if "image_size" in fields:
        size = fields["image_size"]
        sides = [size] if not isinstance(size, (list, tuple)) else list(size)
        if len(sides) not in (1, 2):
            raise CheckpointError(
                f"{where}: {field('image_size')} = {size!r} must be a size or (height, width)"
            )
        sides = [whole(side, names.get("image_size", "image_size"), where) for side in sides]
        if not all(1 <= side <= MAX_IMAGE_SIDE for side in sides):
            raise CheckpointError(
                f"{where}: {field('image_size')} = {size!r} is out of range "
                f"(1..{MAX_IMAGE_SIDE} per side)"
            )
        fields["image_size"] = (sides[0], sides[-1])
    patch = fields.get("patch_size")
    if patch is not None and "image_size" in fields:
        height, width = fields["image_size"]
        if height % patch or width % patch:
            raise CheckpointError(
                f"{where}: {field('patch_size')} = {patch} does not divide "
                f"image_size {height}x{width}"
            )
    if "width" in fields and "num_heads" in fields and fields["width"] % fields["num_heads"]:
        raise CheckpointError(
            f"{where}: {field('num_heads')} = {fields['num_heads']} does not divide "
            f"width {fields['width']}"
        )
    if "ln_eps" in fields:
        eps = fields["ln_eps"]
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float))
            or not math.isfinite(eps)
            or not 0 < eps <= 1
        ):
            raise CheckpointError(
                f"{where}: {field('ln_eps')} = {eps!r} must be a number in (0, 1]"
            )
        fields["ln_eps"] = float(eps)
    if fields.get("layer_scale") is not None:
        scale = fields["layer_scale"]
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or not 0 < scale <= 1e3
        ):
            raise CheckpointError(
                f"{where}: {field('layer_scale')} = {scale!r} must be a number in (0, 1000] or null"
            )
        fields["layer_scale"] = float(scale)
    for name in RATE_FIELDS:
        if name in fields:
            rate = fields[name]
            if (
                isinstance(rate, bool)
                or not isinstance(rate, (int, float))
                or not 0 <= rate < 1  # also false for NaN
            ):
                raise CheckpointError(
                    f"{where}: {field(name)} = {rate!r} must be a number in [0, 1)"
                )
            fields[name] = float(rate)
    for name in BOOL_FIELDS:
        if name in fields and not isinstance(fields[name], bool):
            raise CheckpointError(
                f"{where}: {field(name)} = {fields[name]!r} must be true or false"
            )
    for name in TEXT_FIELDS:
        if name in fields and not isinstance(fields[name], str):
            raise CheckpointError(f"{where}: {field(name)} = {fields[name]!r} must be a string")
    return fields


def skeleton(config: ViTConfig, where: str) -> dict[str, torch.Size]:
    """Name -> shape of every tensor `config`'s model holds, computed without allocating."""
    check_config(config, where)
    if config.pos_embed == "sincos2d" and config.width % 4:
        raise CheckpointError(
            f"{where}: config field width = {config.width} must be divisible by 4 "
            "for the sincos2d position embedding"
        )
    # A learned table has the fixed table's shape and name; building it skips computing sin/cos.
    with torch.device("meta"):
        model = _NoInit(config.replace(pos_embed="learned"))
    count = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    limit = max_parameters()
    if count > limit:
        raise CheckpointError(
            f"{where}: the architecture has {count:,} parameters, more than vitcli loads "
            f"({limit:,}); set {MAX_PARAMETERS_ENV} to raise the limit"
        )
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


class _NoInit(ViT):
    """A ViT whose parameters are never initialised (the one skip-init path): on the meta
    device the first random init (normal_, erfinv_) would import torch._dynamo, seconds for
    shapes known at once; on the CPU it is 1.3-2 s for a B/16, all overwritten by the load."""

    def reset_parameters(self) -> None:
        pass


def uninitialised(config: ViTConfig) -> ViT:
    """ViT(config) without its random init, for a load that sets every value. Not built on the
    meta device: for a sincos model that imports sympy (~1 s) on the first build."""
    model: ViT = _NoInit(config)
    model.__class__ = ViT  # _NoInit only skips reset_parameters: the object is a plain ViT
    return model


def check_state(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    where: str,
) -> None:
    """Refuse `state` (real or meta tensors) unless names and shapes equal `expected`."""
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
        f"{name} is {tuple(state[name].shape)}, expected {tuple(shape)}"
        for name, shape in expected.items()
        if tuple(state[name].shape) != tuple(shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{where}: wrong tensor shapes: "
            + "; ".join(wrong[:3])
            + (" ..." if len(wrong) > 3 else "")
        )


def _sample(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")
