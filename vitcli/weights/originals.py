"""Original releases: DINO and DINOv2 `.pth` files, OpenCLIP `open_clip_model.safetensors`.

- DINO (Caron et al. 2021) `*_pretrain.pth`: the teacher backbone in timm's names; a training
  checkpoint's `teacher` (or `student`) entry works too, with `module.` and `backbone.` stripped
  and the DINO projection head dropped. Positions resample with DINO's (n + 0.1) / n factor.
- DINOv2 hub `.pth`: timm's names plus `mask_token`, `ls1.gamma`, SwiGLU `mlp.w12`/`mlp.w3`
  and `register_tokens` (the position table then has a CLS row, folded into the CLS token as
  timm and transformers do). Positions resample with the offset rule, or antialiased and
  without offset for register models, as the DINOv2 code does.
- OpenCLIP: the OpenAI layout (`visual.conv1`, `class_embedding`, `transformer.resblocks.i`,
  `ln_post`, `proj`) or a timm trunk (`visual.trunk.*`, projection `visual.head.proj`), with
  `open_clip_config.json` beside it for the activation and heads. The text tower is dropped.

Pickles are read with torch.load(weights_only=True) only: nothing in the file runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from ..errors import CheckpointError
from ..model import ViT, ViTConfig
from .files import library_reason, read_json, regular_file
from .format import ModelBundle, build_model
from .limits import max_parameters
from .readers import read_safetensors, read_torch_pickle
from .recipes import dino_recipe, openclip_recipe, preprocess_from_timm
from .timm_families import config_from_state, timm_hints

_OPENAI_SWAPS = (
    ("conv1.", "patch_embed.proj."),
    ("positional_embedding", "pos_embed"),
    ("class_embedding", "cls_token"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre.", "norm_pre."),
    ("ln_post.", "norm."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".attn.in_proj_", ".attn.qkv."),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
    (".ls_1.", ".ls1."),
    (".ls_2.", ".ls2."),
)


def _bundle(model: ViT, preprocess: Preprocess, reference: str, fmt: str, extra: dict):
    config = model.config
    projection = config.head_kind == "projection"
    labels = [f"{'dim' if projection else 'class'}_{i}" for i in range(config.num_classes)]
    extra = {"family": config.family, **extra}
    if config.num_classes == 0 or projection:
        extra["note"] = "no classifier in this checkpoint: embeddings and attention maps only"
    return ModelBundle(
        model=model,
        labels=labels,
        preprocess=preprocess,
        source_format=fmt,
        reference=reference,
        extra=extra,
    )


def _build(state: dict[str, torch.Tensor], config: ViTConfig, where: str, read=None) -> ViT:
    """build_model: config limits and every shape checked before the model is allocated."""
    return build_model(config, state, where, read=read)


# -- DINO and DINOv2 ---------------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict:
    """A torch.save'd dict read with weights_only=True; nested entries (teacher, ...) allowed."""
    import pickle
    import zipfile

    regular_file(path)  # a FIFO is never opened
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch zip file (an old-style torch.save, or not a checkpoint); "
            "save it again with a current torch, or use a .safetensors file"
        )
    try:
        # Memory-mapped: tensors cost nothing until the shapes have been checked.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        KeyError,
        TypeError,
        IndexError,
    ) as error:
        raise CheckpointError(
            f"{path}: cannot be read as plain tensors ({library_reason(error)}); a training "
            "checkpoint with pickled objects is refused: use the released *_pretrain.pth or a "
            ".safetensors file"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return data


def dino_state(raw: dict, where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The backbone tensors of a DINO/DINOv2 file in timm's names; (state, dropped keys)."""
    for entry in ("teacher", "model", "student"):
        if isinstance(raw.get(entry), dict):
            raw = raw[entry]
            break
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in raw.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        name = key.removeprefix("module.").removeprefix("backbone.")
        if name.startswith(("head.mlp.", "head.last_layer.")) or name == "mask_token":
            dropped.append(key)  # DINO's projection head, DINOv2's mask token: training only
            continue
        name = re.sub(r"^blocks\.(\d+)\.mlp\.w12\.", r"blocks.\1.mlp.fc1.", name)
        name = re.sub(r"^blocks\.(\d+)\.mlp\.w3\.", r"blocks.\1.mlp.fc2.", name)
        state[name] = tensor
    total = sum(tensor.numel() for tensor in state.values())
    if total > max_parameters():
        raise CheckpointError(
            f"{where}: holds {total:,} numbers, more than vitcli loads ({max_parameters():,}); "
            "set VITCLI_MAX_PARAMETERS to raise the limit"
        )
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        pos, cls = state.get("pos_embed"), state.get("cls_token")
        if (
            pos is None
            or cls is None
            or pos.ndim != 3
            or cls.ndim != 3
            or pos.shape[1] < 2
            or pos.shape[2] != cls.shape[2]
        ):
            raise CheckpointError(
                f"{where}: register_tokens without a matching cls_token and pos_embed"
            )
        state["cls_token"] = cls + pos[:, :1]  # registers carry no position
        state["pos_embed"] = pos[:, 1:]
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(
            f"{where}: not a DINO or DINOv2 backbone (no patch_embed.proj.weight); "
            "pass a *_pretrain.pth file or a model folder"
        )
    return state, dropped


RAW_FAMILIES = ("dino", "dinov2", "timm")
_RELEASE_NAME = re.compile(r"^(?P<family>dinov2|dino)_")


def load_raw_pth(
    path: Path, reference: str, family: str | None = None, arch: str | None = None
) -> ModelBundle:
    """A `.pth`/`.bin` with no config beside it, identified from evidence, never guessed.

    Evidence, in order: `family` (and `arch`) named by the user (`-m dino:FILE`,
    `-m timm:ARCH:FILE`); a DINO training checkpoint (teacher/student); DINOv2's own tensors
    (mask_token, register_tokens); a classifier head (a timm or DeiT classifier: timm's
    defaults for the architecture its shapes name); a release file name (dino_*, dinov2_*).
    A headless ViT with none of these could be any backbone: refused, naming the options.
    """
    where = str(path)
    raw = read_checkpoint(path)
    wrapper = next(
        (
            key
            for key in ("teacher", "student", "model", "state_dict")
            if isinstance(raw.get(key), dict)
        ),
        None,
    )
    inner = raw[wrapper] if wrapper else raw
    keys = {
        key.removeprefix("module.").removeprefix("backbone.")
        for key, value in inner.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor)
    }
    if "patch_embed.proj.weight" not in keys:
        raise CheckpointError(
            f"{where}: not a ViT state dict (no patch_embed.proj.weight, in timm's, DINO's or "
            "DINOv2's names); pass a *_pretrain.pth file or a model folder"
        )
    dinov2 = bool({"mask_token", "register_tokens"} & keys)
    named = _RELEASE_NAME.match(path.name)
    if family is None:
        if wrapper in ("teacher", "student"):
            family = "dinov2" if dinov2 or "blocks.0.ls1.gamma" in keys else "dino"
        elif dinov2:
            family = "dinov2"
        elif "head.weight" in keys:
            family = "timm"
        elif named:
            family = named.group("family")
        else:
            raise CheckpointError(
                f"{where}: a ViT state dict with no classifier and no config: it could be a DINO "
                "release or another backbone, whose preprocessing differ; name it: "
                f"--model dino:{path} (DINO's eval transform) or --model "
                f"timm:vit_small_patch16_224:{path} (timm's defaults for that architecture)"
            )
    if family == "timm":
        return _load_timm_pth(inner, path, reference, arch, deit_release=wrapper == "model")
    return _load_dino(raw, where, reference, family)


def _load_dino(raw: dict, where: str, reference: str, family: str) -> ModelBundle:
    state, dropped = dino_state(raw, where)
    dinov2 = "blocks.0.ls1.gamma" in state or family == "dinov2"
    registers = "reg_token" in state
    config = config_from_state(
        state,
        where,
        pos_resample="bicubic-antialias" if registers else "bicubic-offset",
        family=("dinov2-reg" if registers else "dinov2") if dinov2 else "dino",
    )
    model = _build(state, config, where)
    extra: dict = {"dropped": sorted(dropped)} if dropped else {}
    return _bundle(model, dino_recipe(), reference, "dino", extra)


def _load_timm_pth(
    raw: dict, path: Path, reference: str, arch: str | None, deit_release: bool
) -> ModelBundle:
    """A timm (or DeiT release) classifier's state dict: timm's pretrained defaults for its
    architecture, which the shapes name unless `arch` does."""
    where = str(path)
    state = {
        key.removeprefix("module."): value
        for key, value in raw.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor)
    }
    if arch is None:
        arch = _architecture(state, where, deit="dist_token" in state or deit_release)
    cfg = timm_default_cfg(arch, where)
    config = config_from_state(state, where, name=arch, **timm_hints(arch))
    model = _build(state, config, where)
    preprocess, _ = preprocess_from_timm(cfg, config.image_size, f"timm's {arch} defaults")
    bundle = _bundle(model, preprocess, reference, "timm", {"architecture": arch})
    bundle.extra["note"] = (
        f"a state dict without config: read as timm's {arch} (its default preprocessing); "
        f"name another with --model timm:ARCH:{path}"
    )
    if config.num_classes == 1000:
        from .timm import imagenet1k_labels

        bundle.labels[:] = list(imagenet1k_labels())
    return bundle


def timm_default_cfg(arch: str, where: str) -> dict:
    """timm's pretrained_cfg defaults (vision_transformer.py's and deit.py's _cfg)."""
    name = arch.split(".")[0]
    if name.startswith("deit_"):
        return {"crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD}  # fmt: skip
    words = set(name.split("_"))
    if name.startswith("vit_") and not words & {"clip", "siglip", "dinov2", "reg4", "sam"}:
        return {"crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5)}  # fmt: skip
    raise CheckpointError(
        f"{where}: timm architecture {arch!r}: only vit_* and deit_* defaults are known for a "
        "state dict without config; pass the model's hub folder (config.json) instead"
    )


def _architecture(state: dict[str, torch.Tensor], where: str, deit: bool) -> str:
    """timm's name for the plain ViT these shapes describe, e.g. vit_small_patch16_224."""
    from .timm import TIMM_SIZES

    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None or pos is None or proj.ndim != 4 or pos.ndim != 3:
        raise CheckpointError(f"{where}: not a ViT state dict in timm's layout")
    width, patch = int(proj.shape[0]), int(proj.shape[2])
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    prefix = int("cls_token" in state) + int("dist_token" in state)
    side = int(round((int(pos.shape[1]) - prefix) ** 0.5))
    for word, (size_depth, size_width, _, _) in TIMM_SIZES.items():
        if (size_depth, size_width) == (depth, width):
            stem = "deit" if deit else "vit"
            suffix = "_distilled" if "dist_token" in state else ""
            return f"{stem}_{word}{suffix}_patch{patch}_{side * patch}"
    raise CheckpointError(
        f"{where}: depth {depth} and width {width} match no timm ViT size; name the "
        f"architecture: --model timm:ARCH:{where}"
    )


def _head_bias(state: dict[str, torch.Tensor]) -> None:
    """CLIP's projection has no bias; a zero one keeps timm's head layout (meta stays meta)."""
    head = state.get("head.weight")
    if head is not None and "head.bias" not in state and head.ndim == 2:
        state["head.bias"] = torch.zeros(head.shape[0], device=head.device, dtype=head.dtype)


# -- OpenCLIP ----------------------------------------------------------------------------------
def openclip_state(
    raw: dict[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Vision tensors in timm's names; (state, "openai" or "timm", dropped keys)."""
    raw = {key.removeprefix("module."): value for key, value in raw.items()}
    state: dict[str, torch.Tensor] = {}
    dropped = sorted(key for key in raw if not key.startswith("visual."))
    if "visual.trunk.patch_embed.proj.weight" in raw:
        for key, tensor in raw.items():
            if key.startswith("visual.trunk."):
                state[key.removeprefix("visual.trunk.")] = tensor
            elif key.startswith("visual.head.proj."):
                state["head." + key.removeprefix("visual.head.proj.")] = tensor
            elif key.startswith("visual."):
                raise CheckpointError(
                    f"{where}: OpenCLIP tower part {key} is not supported (an MLP or attention "
                    "projection head); supported: linear or no projection"
                )
        return state, "timm", dropped
    if "visual.conv1.weight" not in raw:
        raise CheckpointError(f"{where}: not an OpenCLIP vision tower (no visual.conv1.weight)")
    for key, tensor in raw.items():
        if not key.startswith("visual."):
            continue
        name = key.removeprefix("visual.")
        for old, new in _OPENAI_SWAPS:
            name = name.replace(old, new)
        if name == "proj":  # (D, E), applied as x @ proj
            if tensor.ndim != 2:
                raise CheckpointError(f"{where}: {key} has shape {tuple(tensor.shape)}, not (D, E)")
            state["head.weight"] = tensor.t()
        elif name == "cls_token":
            state[name] = tensor.reshape(1, 1, -1)
        elif name == "pos_embed":
            state[name] = tensor.unsqueeze(0)
        elif name.startswith(("attn_pool", "text")):
            raise CheckpointError(f"{where}: OpenCLIP tower part {key} is not supported")
        else:
            state[name] = tensor
    return state, "openai", dropped


def load_openclip(weights: Path, reference: str) -> ModelBundle:
    """OpenCLIP's open_clip_model.safetensors (or open_clip_pytorch_model.bin) and its config."""
    where = str(weights)
    if weights.suffix == ".safetensors":
        raw, _ = read_safetensors(weights, meta=True)  # the header only
    else:
        raw = read_torch_pickle(weights, meta=True)
    state, layout, dropped = openclip_state(raw, where)
    _head_bias(state)
    spec_path = weights.parent / "open_clip_config.json"
    spec = read_json(spec_path) if spec_path.exists() else {}
    if not isinstance(spec, dict):
        raise CheckpointError(f"{spec_path}: expected a JSON object")
    model_cfg = spec.get("model_cfg", spec)
    vision = model_cfg.get("vision_cfg") if isinstance(model_cfg, dict) else None
    if not isinstance(vision, dict):
        vision = {}
        model_cfg = model_cfg if isinstance(model_cfg, dict) else {}

    def read() -> dict[str, torch.Tensor]:
        if weights.suffix == ".safetensors":
            real = read_safetensors(weights)[0]
        else:
            real = read_torch_pickle(weights)
        real_state = openclip_state(real, where)[0]
        _head_bias(real_state)
        return real_state

    if layout == "timm":
        hints = timm_hints(str(vision.get("timm_model_name", "")))
        hints["head_kind"] = "projection"
        pool = {"map": "map", "avg": "mean", "token": "cls"}.get(vision.get("timm_pool") or "")
        config = config_from_state(state, where, pool=pool, **hints)
    else:
        width = int(state["patch_embed.proj.weight"].shape[0])
        head_width = vision.get("head_width", 64)
        if isinstance(head_width, bool) or not isinstance(head_width, int) or head_width < 1:
            raise CheckpointError(f"{spec_path}: head_width {head_width!r} is not a width")
        heads = vision.get("heads") or max(width // head_width, 1)
        pool = {"tok": "cls", "avg": "mean"}.get(vision.get("pool_type", "tok"))
        if pool is None or vision.get("final_ln_after_pool") or vision.get("attentional_pool"):
            raise CheckpointError(
                f"{where}: OpenCLIP pooling {vision.get('pool_type')!r} with these options is "
                "not supported; supported: the class token or the average after ln_post"
            )
        if isinstance(heads, bool) or not isinstance(heads, int):
            raise CheckpointError(f"{spec_path}: heads {heads!r} is not a whole number")
        config = config_from_state(
            state,
            where,
            num_heads=heads,
            act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
            ln_eps=1e-5,
            pool=pool,
            head_kind="projection",
            pos_resample="bicubic",
            family="clip",
        )
    model = _build(state, config, where, read=read)
    recipe = spec.get("preprocess_cfg") or {}
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{spec_path}: preprocess_cfg must be a JSON object")
    preprocess = openclip_recipe(recipe, vision, config.image_size, str(spec_path))
    return _bundle(model, preprocess, reference, "openclip", {"dropped_text_tower": len(dropped)})
