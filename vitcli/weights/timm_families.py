"""timm's ViT families (DeiT distilled, DeiT III, DINOv2 with or without registers, CLIP,
SigLIP) and any state dict already in timm's layout: the config is read off the tensors.

timm builds every one of these from one VisionTransformer, so its tensor names are ours; what a
state dict does not say (heads, activation, LayerNorm eps, the image size) comes from the
architecture name and config.json. The same inference serves the original DINO/DINOv2 releases
and OpenCLIP towers once their keys are renamed (weights/originals.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model import ViTConfig
from .format import FEATURES_ONLY, ModelBundle, build_model, checkpoint_bundle
from .limits import check_config

# Head counts of the published widths (timm's size words, DINOv2 giant, CLIP bigG, SO400M).
HEADS_BY_WIDTH = {
    192: 3,
    384: 6,
    512: 8,
    640: 10,
    768: 12,
    1024: 16,
    1152: 16,
    1280: 16,
    1408: 16,
    1536: 24,
    1664: 16,
}
# Words in a timm architecture that this module builds.
_FAMILY_WORDS = ("distilled", "dinov2", "clip", "quickgelu", "siglip", "gap", "map")
_REG_WORD = re.compile(r"(?:^|_)reg(\d+)(?:_|$)")
# Prefixes of timm architectures outside our ViT, named in the refusal.
UNSUPPORTED_TIMM = {
    "beit": "BEiT (relative position bias)",
    "eva": "EVA (RoPE)",
    "swin": "Swin (shifted windows)",
    "vit_relpos": "ViT with relative position bias",
    "vit_srelpos": "ViT with relative position bias",
    "samvit": "SAM ViT (windowed attention)",
    "vit_base_patch16_rope": "ViT with RoPE",
    "naflexvit": "NaFlex ViT (variable patch grids)",
    "flexivit": "FlexiViT (resizable patches)",
    "cait": "CaiT (class-attention blocks)",
    "xcit": "XCiT (cross-covariance attention)",
    "levit": "LeViT (convolutional stages)",
}
_UNSUPPORTED_WORDS = {"rope": "ViT with RoPE", "xp": "ViT with xPos"}


def is_family_architecture(arch: str) -> bool:
    """True for a timm ViT name that needs more than the 2020 ViT's flags."""
    name = arch.split(".")[0]
    words = name.split("_")
    return (
        name.startswith("deit3_")
        or any(word in words for word in _FAMILY_WORDS)
        or bool(_REG_WORD.search(name))
    )


def refuse_unsupported_timm(arch: str, where: str) -> None:
    """One line naming the family for timm architectures we do not build."""
    from .hf_families import SUPPORTED_TEXT

    name = arch.split(".")[0]
    family = next(
        (what for prefix, what in UNSUPPORTED_TIMM.items() if name.startswith(prefix)),
        None,
    )
    if family is None and name.startswith("vit_"):
        words = name.split("_")
        family = next((what for word, what in _UNSUPPORTED_WORDS.items() if word in words), None)
    if family:
        raise CheckpointError(
            f"{where}: timm {name} is {family}, not supported; supported: {SUPPORTED_TEXT}"
        )


# Our config fields -> what a timm-layout state dict shows, so errors name what the user sees.
_NAMES = {
    "width": "patch_embed.proj.weight rows (embed_dim)",
    "in_channels": "patch_embed.proj.weight channels",
    "patch_size": "patch_embed.proj.weight kernel (patch_size)",
    "reg_tokens": "reg_token rows (reg_tokens)",
    "mlp_dim": "blocks.0.mlp.fc2.weight columns (mlp dim)",
    "depth": "number of blocks (depth)",
    "num_classes": "head.weight rows (num_classes)",
    "image_size": "image size (img_size)",
}


def _depth(state: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def config_from_state(
    state: dict[str, torch.Tensor],
    where: str,
    *,
    num_heads: int | None = None,
    image_size: tuple[int, int] | None = None,
    act: str = "gelu",
    ln_eps: float = 1e-6,
    pool: str | None = None,
    head_kind: str = "classifier",
    layer_scale: float = 1e-5,
    pos_resample: str = "bicubic-antialias",
    family: str = "vit",
    name: str = "",
) -> ViTConfig:
    """The ViTConfig that a timm-layout state dict describes; hints fill what tensors omit."""
    proj = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    if proj is None or pos is None or fc1 is None or fc2 is None or proj.ndim != 4:
        raise CheckpointError(
            f"{where}: not a ViT state dict in timm's layout (patch_embed.proj, pos_embed and "
            "blocks.0.mlp are needed)"
        )
    width, in_channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    # Header shapes are a stranger's claims: bound them before any arithmetic trusts them.
    check_config(
        {"width": width, "in_channels": in_channels, "patch_size": patch}, where, names=_NAMES
    )
    reg = state.get("reg_token")
    registers = int(reg.shape[1]) if reg is not None and reg.ndim == 3 else 0
    check_config({"reg_tokens": registers}, where, names=_NAMES)
    class_token, dist_token = "cls_token" in state, "dist_token" in state
    prefix = int(class_token) + int(dist_token) + registers
    if pos.numel() % width or pos.numel() == 0:
        raise CheckpointError(
            f"{where}: pos_embed has shape {tuple(pos.shape)}, not rows of width {width}"
        )
    rows = pos.numel() // width
    if rows <= prefix and image_size is None:
        raise CheckpointError(f"{where}: cannot tell the image size from {rows} positions")
    if image_size is not None:
        patches = (image_size[0] // patch) * (image_size[1] // patch)
        if rows not in (patches, patches + prefix):
            raise CheckpointError(
                f"{where}: position table has {rows} rows, which fits neither {patches} patches "
                f"of a {image_size[0]}x{image_size[1]} image nor them plus {prefix} prefix tokens"
            )
        no_embed_class = prefix > 0 and rows == patches
    else:
        side = math.isqrt(rows - prefix)
        no_embed_class = side * side != rows - prefix
        side = side if not no_embed_class else math.isqrt(rows)
        if side * side not in (rows, rows - prefix):
            raise CheckpointError(f"{where}: cannot tell the image size from {rows} positions")
        image_size = (side * patch, side * patch)
    if fc2.ndim != 2 or fc1.ndim != 2:
        raise CheckpointError(f"{where}: blocks.0.mlp weights are not matrices")
    mlp_dim = int(fc2.shape[1])
    swiglu = int(fc1.shape[0]) == 2 * mlp_dim
    if num_heads is None:
        # Published widths by table, else 64-wide heads (every DINO/DINOv2/CLIP ViT uses 64).
        num_heads = HEADS_BY_WIDTH.get(width) or (width // 64 if width % 64 == 0 else None)
        if num_heads is None:
            raise CheckpointError(
                f"{where}: cannot tell the number of heads of width {width}; "
                "give num_heads in the config (timm model_args)"
            )
    head = state.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim else 0
    if "attn_pool.latent" in state:
        pool = "map"
    elif "head_dist.weight" in state:
        pool = "dist"
    elif pool is None:
        pool = "cls" if class_token else "mean"
    fields = check_config(
        dict(
            image_size=image_size,
            patch_size=patch,
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            depth=_depth(state),
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            reg_tokens=registers,
            ln_eps=ln_eps,
            layer_scale=layer_scale if "blocks.0.ls1.gamma" in state else None,
        ),
        where,
        names=_NAMES,
    )
    try:
        return ViTConfig(
            **fields,
            class_token=class_token,
            pool=pool,
            qkv_bias="blocks.0.attn.qkv.bias" in state,
            act="swiglu" if swiglu else act,
            dist_token=dist_token,
            no_embed_class=no_embed_class,
            pre_norm="norm_pre.weight" in state,
            patch_bias="patch_embed.proj.bias" in state,
            fc_norm="fc_norm.weight" in state,
            head_kind=head_kind if num_classes else "classifier",
            pos_resample=pos_resample,
            family=family,
            name=name,
        )
    except ValueError as error:
        raise CheckpointError(f"{where}: unusable ViT config ({error})") from None


def timm_hints(arch: str, tag: str = "") -> dict:
    """What a timm architecture name says beyond the tensors: act, eps, family, head kind."""
    name = arch.split(".")[0]
    words = name.split("_")
    hints: dict = {"family": "vit"}
    if name.startswith("deit"):
        hints.update(family="deit", layer_scale=1e-6)
    if "dinov2" in words:
        hints.update(family="dinov2-reg" if _REG_WORD.search(name) else "dinov2")
    if "clip" in words:
        hints.update(family="clip", ln_eps=1e-5)  # timm builds CLIP with nn.LayerNorm's eps
        if "quickgelu" in words:
            hints.update(act="quick_gelu")
    if "siglip" in words:
        # timm builds SigLIP with exact GELU (transformers uses the tanh form): timm's rule.
        hints.update(family="siglip")
    fine_tuned = any(mark in tag for mark in ("ft_", "in1k", "in12k", "in21k", "in22k"))
    if hints["family"] in ("clip", "siglip") and not fine_tuned:
        hints.update(head_kind="projection")  # e.g. .openai, .laion2b: head = image projection
    return hints


def _image_size(args: dict, pretrained: dict, where: str) -> tuple[int, int] | None:
    """model_args img_size, else pretrained_cfg input_size (C, H, W); None when neither says."""
    value = args.get("img_size") or pretrained.get("input_size")
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 3:
        value = value[1:]  # input_size is (C, H, W)
    return check_config({"image_size": value}, where, names=_NAMES)["image_size"]


def load_timm_family(path: Path, config: dict, reference: str) -> ModelBundle:
    """A timm folder of one of the families (config.json `architecture` + model.safetensors)."""
    from .timm import labels_for, preprocess_from_timm, timm_weights

    path = Path(path)
    arch = str(config.get("architecture") or "")
    pretrained = config.get("pretrained_cfg") or {}
    args = config.get("model_args") or {}
    if not isinstance(pretrained, dict) or not isinstance(args, dict):
        raise CheckpointError(f"{path}: pretrained_cfg and model_args must be JSON objects")
    weights, state, read = timm_weights(path)
    image_size = _image_size(args, pretrained, str(path))
    hints = timm_hints(arch, tag=str(pretrained.get("tag") or ""))
    global_pool = args.get("global_pool", config.get("global_pool", "token")) or "token"
    if global_pool not in ("token", "avg", "map"):
        raise CheckpointError(f"{path}: global_pool {global_pool!r} is not supported")
    num_heads = None
    if "num_heads" in args:
        num_heads = check_config({"num_heads": args["num_heads"]}, str(path))["num_heads"]
    vit_config = config_from_state(
        state,
        str(weights),
        num_heads=num_heads,
        image_size=image_size,
        pool={"token": "cls", "avg": "mean", "map": "map"}[global_pool],
        name=arch.split(".")[0],
        **hints,
    )
    model = build_model(vit_config, state, str(weights), read=read)
    projection = vit_config.head_kind == "projection"
    if projection:
        labels, label_source = [f"dim_{i}" for i in range(vit_config.num_classes)], "projection"
    else:
        labels, label_source = labels_for(config, vit_config.num_classes)
    preprocess, notes = preprocess_from_timm(
        pretrained, vit_config.image_size, f"{path / 'config.json'} pretrained_cfg"
    )
    extra = {
        "architecture": arch,
        "labels_from": label_source,
        "family": vit_config.family,
        "tag": pretrained.get("tag"),
    }
    return checkpoint_bundle(
        model,
        labels,
        preprocess,
        "timm",
        reference,
        extra,
        notes,
        features_only=FEATURES_ONLY if vit_config.num_classes == 0 or projection else None,
    )


def load_timm(path: Path, config: dict, reference: str) -> ModelBundle:
    """The one timm loader: a plain ViT (timm.py) or a family architecture (this module),
    from a hub folder whose config.json is `config`."""
    from .timm import load_timm_folder

    arch = config.get("architecture")
    if isinstance(arch, str):
        refuse_unsupported_timm(arch, str(path))
        if is_family_architecture(arch):
            return load_timm_family(path, config, reference=reference)
    return load_timm_folder(path, config, reference=reference)
