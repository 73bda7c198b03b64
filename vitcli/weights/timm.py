"""timm hub folders: config.json {architecture, num_classes, global_pool, pretrained_cfg} +
model.safetensors whose tensor names are already ours (timm's)."""

from __future__ import annotations

import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..data.preprocess import Preprocess
from ..errors import CheckpointError
from ..model import ViT, ViTConfig
from .format import ModelBundle, default_labels, load_state

# timm's size words -> (depth, width, mlp_dim, num_heads); the paper's five plus timm's medium.
TIMM_SIZES = {
    "tiny": (12, 192, 768, 3),
    "small": (12, 384, 1536, 6),
    "medium": (12, 512, 2048, 8),
    "base": (12, 768, 3072, 12),
    "large": (24, 1024, 4096, 16),
    "huge": (32, 1280, 5120, 16),
}
_PAPER_NAMES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
_ARCH = re.compile(r"^(?:vit|deit)_(?P<size>[a-z]+)_patch(?P<patch>\d+)(?P<rest>(?:_[a-z0-9]+)*)$")
# Architecture suffixes that change the network beyond what ViTConfig describes.
_UNSUPPORTED = (
    "clip",
    "siglip",
    "reg",
    "rope",
    "distilled",
    "gap",
    "map",
    "xp",
    "ls",
    "dinov2",
    "sam",
)


def parse_architecture(name: str) -> tuple[str, int, tuple[int, int] | None]:
    """'vit_base_patch16_224' -> ('base', 16, (224, 224)); image size None when not in the name."""
    match = _ARCH.match(name.split(".")[0])
    if not match or match.group("size") not in TIMM_SIZES:
        raise CheckpointError(
            f"timm architecture {name!r} is not a plain ViT this tool can build; "
            f"supported: vit_{{{','.join(TIMM_SIZES)}}}_patch{{8,14,16,32}}_{{224,384,...}}"
        )
    words = [word for word in match.group("rest").split("_") if word]
    odd = [
        word
        for word in words
        if not word.isdigit() and any(word.startswith(u) for u in _UNSUPPORTED)
    ]
    if odd:
        raise CheckpointError(
            f"timm architecture {name!r} has parts this tool does not implement ({', '.join(odd)}); "
            "only plain ViTs (class token, learned position embedding) are supported"
        )
    sizes = [int(word) for word in words if word.isdigit()]
    image_size = (sizes[-1], sizes[-1]) if sizes else None
    return match.group("size"), int(match.group("patch")), image_size


@lru_cache(maxsize=1)
def imagenet1k_labels() -> tuple[str, ...]:
    """ImageNet-1k class names in index order (sorted WordNet ids), from timm's data files."""
    text = (
        resources.files("vitcli.weights")
        .joinpath("imagenet1k_labels.txt")
        .read_text(encoding="utf-8")
    )
    labels = tuple(line for line in text.splitlines() if line)
    assert len(labels) == 1000, "imagenet1k_labels.txt must hold 1000 names"
    return labels


def labels_for(config: dict, num_classes: int) -> tuple[list[str], str]:
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    if names and len(names) == num_classes:
        return [str(name) for name in names], "label_names"
    if num_classes == 1000:
        return list(imagenet1k_labels()), "imagenet-1k"
    return default_labels(num_classes), "generic"


def preprocess_from_timm(
    pretrained: dict, image_size: tuple[int, int]
) -> tuple[Preprocess, list[str]]:
    """timm's eval transform: resize (shorter side to size / crop_pct), center crop, normalise."""
    notes: list[str] = []
    input_size = pretrained.get("input_size")
    size = (int(input_size[-2]), int(input_size[-1])) if input_size else image_size
    crop_pct = float(pretrained.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    crop_mode = pretrained.get("crop_mode") or "center"
    interpolation = pretrained.get("interpolation") or "bicubic"
    mean = pretrained.get("mean") or (0.485, 0.456, 0.406)
    std = pretrained.get("std") or (0.229, 0.224, 0.225)
    if crop_mode == "squash":
        if crop_pct != 1.0:
            notes.append(
                f"timm's squash with crop_pct {crop_pct} is approximated by a plain squash"
            )
        resize = "squash"
    else:
        if crop_mode != "center":
            notes.append(f"crop_mode {crop_mode!r} is approximated by a center crop")
        resize = "shorter"
    try:
        return Preprocess(
            size=size,
            resize=resize,
            crop_pct=min(crop_pct, 1.0),
            interpolation=interpolation,
            mean=mean,
            std=std,
        ), notes
    except Exception as error:
        raise CheckpointError(f"unsupported timm preprocessing ({error})") from None


def load_timm_folder(path: Path, config: dict, reference: str) -> ModelBundle:
    from .format import read_safetensors
    from .hf import read_torch_pickle
    from .timm_families import is_family_architecture, load_timm_family, refuse_unsupported_timm

    path = Path(path)
    arch = config.get("architecture") or ""
    refuse_unsupported_timm(arch, str(path))
    if is_family_architecture(arch):
        return load_timm_family(path, config, reference=reference)
    size, patch, name_size = parse_architecture(arch)
    pretrained = config.get("pretrained_cfg") or {}
    weights = path / "model.safetensors"
    if weights.is_file():
        state, _ = read_safetensors(weights)
    elif (path / "pytorch_model.bin").is_file():
        weights = path / "pytorch_model.bin"
        state = read_torch_pickle(weights)
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors in this timm folder; download the weights too"
        )
    if "fc_norm.weight" in state or "norm_pre.weight" in state:
        raise CheckpointError(
            f"{weights}: this timm model uses fc_norm/norm_pre layers that plain ViT does not have; not supported"
        )
    depth, width, mlp_dim, num_heads = TIMM_SIZES[size]
    # timm lets config.json override the named architecture through model_args.
    args = config.get("model_args") or {}
    width = int(args.get("embed_dim", width))
    depth = int(args.get("depth", depth))
    num_heads = int(args.get("num_heads", num_heads))
    mlp_dim = (
        int(width * float(args["mlp_ratio"]))
        if "mlp_ratio" in args
        else (mlp_dim if "embed_dim" not in args else 4 * width)
    )
    patch = int(args.get("patch_size", patch))
    if args.get("class_token") is False or args.get("no_embed_class") or args.get("reg_tokens"):
        raise CheckpointError(
            f"{path}: timm model_args {args} describe a ViT variant this tool does not build"
        )
    input_size = pretrained.get("input_size")
    if "img_size" in args:
        image_size = args["img_size"]
    elif input_size:
        image_size = (int(input_size[-2]), int(input_size[-1]))
    else:
        image_size = name_size
    if image_size is None:
        # Neither config nor name says: a square grid from the position table.
        pos = state.get("pos_embed")
        tokens = int(pos.shape[1]) - 1 if pos is not None else 196
        side = math.isqrt(tokens)
        image_size = (side * patch, side * patch)
    num_classes = int(
        args.get("num_classes", config.get("num_classes", pretrained.get("num_classes", 1000)))
    )
    global_pool = args.get("global_pool", config.get("global_pool", "token")) or "token"
    if global_pool not in ("token", "avg"):
        raise CheckpointError(
            f"{path}: global_pool {global_pool!r} is not supported (use token or avg)"
        )
    try:
        vit_config = ViTConfig(
            image_size=image_size,
            patch_size=patch,
            num_classes=num_classes,
            width=width,
            depth=depth,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            pool="cls" if global_pool == "token" else "mean",
            ln_eps=1e-6,
            act="gelu",
            qkv_bias=bool(args.get("qkv_bias", True)),
            name=f"{_PAPER_NAMES[size]}/{patch}" if size in _PAPER_NAMES and not args else "",
        )
    except ValueError as error:
        raise CheckpointError(f"{path}: unusable timm config ({error})") from None
    model = ViT(vit_config)
    load_state(model, state, str(weights))
    model.eval()
    labels, label_source = labels_for(config, num_classes)
    preprocess, notes = preprocess_from_timm(pretrained, vit_config.image_size)
    extra: dict = {"architecture": arch, "labels_from": label_source}
    if pretrained.get("tag"):
        extra["tag"] = pretrained["tag"]
    if notes:
        extra["preprocess_notes"] = notes
    return ModelBundle(
        model=model,
        labels=labels,
        preprocess=preprocess,
        source_format="timm",
        reference=reference,
        extra=extra,
    )
