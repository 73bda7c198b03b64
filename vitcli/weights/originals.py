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
from .format import ModelBundle, build_model
from .limits import max_parameters
from .readers import library_reason, read_json, read_safetensors, read_torch_pickle, regular_file
from .timm_families import config_from_state, timm_hints

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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


def load_dino_pth(path: Path, reference: str) -> ModelBundle:
    """A DINO or DINOv2 release `.pth` (or a DINO training checkpoint's teacher)."""
    where = str(path)
    state, dropped = dino_state(read_checkpoint(path), where)
    dinov2 = "blocks.0.ls1.gamma" in state
    registers = "reg_token" in state
    config = config_from_state(
        state,
        where,
        pos_resample="bicubic-antialias" if registers else "bicubic-offset",
        family=("dinov2-reg" if registers else "dinov2") if dinov2 else "dino",
    )
    model = _build(state, config, where)
    # DINOv2 evaluates at 224 with shorter side 256; DINO the same (its eval_linear.py).
    preprocess = Preprocess(
        size=(224, 224),
        resize="shorter",
        crop_pct=224 / 256,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    extra: dict = {"dropped": sorted(dropped)} if dropped else {}
    return _bundle(model, preprocess, reference, "dino", extra)


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
    # OpenCLIP: shorter side to the size then centre crop, unless resize_mode says squash.
    preprocess = Preprocess(
        size=config.image_size,
        resize="squash" if recipe.get("resize_mode") == "squash" else "shorter",
        crop_pct=1.0,
        interpolation=recipe.get("interpolation") or "bicubic",
        mean=recipe.get("mean") or vision.get("image_mean") or OPENAI_CLIP_MEAN,
        std=recipe.get("std") or vision.get("image_std") or OPENAI_CLIP_STD,
    )
    return _bundle(model, preprocess, reference, "openclip", {"dropped_text_tower": len(dropped)})
