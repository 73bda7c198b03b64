"""timm hub folders: config.json {architecture, num_classes, global_pool, pretrained_cfg} +
model.safetensors whose tensor names are already ours (timm's)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import CheckpointError
from ..model import VARIANTS, ViTConfig
from .format import ModelBundle, build_model, checkpoint_bundle, default_labels
from .limits import check_config
from .readers import read_safetensors, read_torch_pickle
from .recipes import preprocess_from_timm

_PAPER_NAMES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
# timm's size words -> (depth, width, mlp_dim, num_heads): the paper's table plus timm's medium.
TIMM_SIZES = {word: VARIANTS[name] for word, name in _PAPER_NAMES.items()} | {
    "medium": (12, 512, 2048, 8)
}
# Our config fields -> timm's model_args keys, so errors name what the user sees.
TIMM_NAMES = {
    "image_size": "img_size",
    "width": "embed_dim",
    "num_heads": "num_heads",
    "mlp_dim": "embed_dim x mlp_ratio",
    "patch_size": "patch_size",
}
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
            f"timm architecture {name!r} has parts this tool does not implement "
            f"({', '.join(odd)}); only plain ViTs (class token, learned position embedding) "
            "are supported"
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


def labels_for(config: dict, num_classes: int, where: str = "") -> tuple[list[str], str]:
    pretrained = config.get("pretrained_cfg") or {}
    names = config.get("label_names") or (
        pretrained.get("label_names") if isinstance(pretrained, dict) else None
    )
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(name, str) for name in names)
    ):
        raise CheckpointError(f"{where}: label_names must be a list of class names (strings)")
    if names and len(names) == num_classes:
        return list(names), "label_names"
    if num_classes == 1000:
        return list(imagenet1k_labels()), "imagenet-1k"
    return default_labels(num_classes), "generic"


def timm_weights(path: Path) -> tuple[Path, dict, Callable[[], dict]]:
    """A timm folder's weights file, its tensors' headers (meta tensors) and a reader of the
    real tensors, for build_model."""
    weights = path / "model.safetensors"
    if weights.exists():
        return (
            weights,
            read_safetensors(weights, meta=True)[0],
            lambda: read_safetensors(weights)[0],
        )
    weights = path / "pytorch_model.bin"
    if weights.exists():
        return weights, read_torch_pickle(weights, meta=True), lambda: read_torch_pickle(weights)
    raise CheckpointError(
        f"{path}: no model.safetensors in this timm folder; download the weights too"
    )


def load_timm_folder(path: Path, config: dict, reference: str) -> ModelBundle:
    """A timm hub folder as a ModelBundle; shapes are checked before tensor data is read."""
    path = Path(path)
    arch = config.get("architecture") or ""
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: timm architecture {arch!r} is not a name")
    size, patch, name_size = parse_architecture(arch)
    pretrained = config.get("pretrained_cfg") or {}
    args = config.get("model_args") or {}  # timm's override of the named architecture
    if not isinstance(pretrained, dict) or not isinstance(args, dict):
        raise CheckpointError(f"{path}: pretrained_cfg and model_args must be JSON objects")
    weights, state, read = timm_weights(path)
    if "fc_norm.weight" in state or "norm_pre.weight" in state:
        raise CheckpointError(
            f"{weights}: this timm model uses fc_norm/norm_pre layers that plain ViT "
            "does not have; not supported"
        )
    vit_config = _timm_config(path, config, args, pretrained, state, size, patch, name_size)
    model = build_model(vit_config, state, str(weights), read=read)
    labels, label_source = labels_for(config, vit_config.num_classes, str(path))
    preprocess, notes = preprocess_from_timm(
        pretrained, vit_config.image_size, f"{path / 'config.json'} pretrained_cfg"
    )
    extra = {"architecture": arch, "labels_from": label_source, "tag": pretrained.get("tag")}
    return checkpoint_bundle(model, labels, preprocess, "timm", reference, extra, notes)


def _timm_config(
    path: Path,
    config: dict,
    args: dict,
    pretrained: dict,
    state: dict,
    size: str,
    patch: int,
    name_size: tuple[int, int] | None,
) -> ViTConfig:
    where = str(path)
    depth, width, mlp_dim, num_heads = TIMM_SIZES[size]
    if args.get("class_token") is False or args.get("no_embed_class") or args.get("reg_tokens"):
        raise CheckpointError(
            f"{path}: timm model_args {args} describe a ViT variant this tool does not build"
        )
    global_pool = args.get("global_pool", config.get("global_pool", "token")) or "token"
    if global_pool not in ("token", "avg"):
        raise CheckpointError(
            f"{path}: global_pool {global_pool!r} is not supported (use token or avg)"
        )
    try:
        width = args.get("embed_dim", width)
        if "mlp_ratio" in args:
            mlp_dim = int(float(width) * float(args["mlp_ratio"]))
        elif "embed_dim" in args:
            mlp_dim = 4 * int(width)
        input_size = pretrained.get("input_size")
        if "img_size" in args:
            image_size = args["img_size"]
        elif input_size:
            image_size = (input_size[-2], input_size[-1])
        else:
            image_size = name_size
        patch = args.get("patch_size", patch)
        if image_size is None:
            # Neither config nor name says: a square grid from the position table.
            pos = state.get("pos_embed")
            tokens = int(pos.shape[1]) - 1 if pos is not None and pos.ndim == 3 else 196
            side = math.isqrt(max(tokens, 1))
            image_size = (side * int(patch), side * int(patch))
    except (ValueError, TypeError, ArithmeticError, IndexError) as error:
        raise CheckpointError(f"{path}: unusable timm config ({error})") from None
    fields = check_config(
        {
            "image_size": image_size,
            "patch_size": patch,
            "num_classes": args.get(
                "num_classes", config.get("num_classes", pretrained.get("num_classes", 1000))
            ),
            "width": width,
            "depth": args.get("depth", depth),
            "num_heads": args.get("num_heads", num_heads),
            "mlp_dim": mlp_dim,
            "qkv_bias": args.get("qkv_bias", True),
        },
        where,
        names=TIMM_NAMES if args else {},
    )
    try:
        return ViTConfig(
            **fields,
            pool="cls" if global_pool == "token" else "mean",
            ln_eps=1e-6,
            act="gelu",
            name=f"{_PAPER_NAMES[size]}/{patch}" if size in _PAPER_NAMES and not args else "",
        )
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: unusable timm config ({error})") from None
