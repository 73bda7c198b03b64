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

import json
import re
from pathlib import Path

import torch

from ..data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from ..errors import CheckpointError
from ..model import ViT, ViTConfig
from .format import ModelBundle, load_state, read_safetensors
from .hf import read_torch_pickle
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


def _build(state: dict[str, torch.Tensor], config: ViTConfig, where: str) -> ViT:
    model = ViT(config)
    load_state(model, state, where)
    return model.eval()


# -- DINO and DINOv2 ---------------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict:
    """A torch.save'd dict read with weights_only=True; nested entries (teacher, ...) allowed."""
    import pickle

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{path}: cannot be read as plain tensors ({first}); a training checkpoint with "
            "pickled objects is refused: use the released *_pretrain.pth or a .safetensors file"
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
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        pos = state["pos_embed"]
        state["cls_token"] = state["cls_token"] + pos[:, :1]  # registers carry no position
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
        raw, _ = read_safetensors(weights)
    else:
        raw = read_torch_pickle(weights)
    state, layout, dropped = openclip_state(raw, where)
    spec_path = weights.parent / "open_clip_config.json"
    try:
        spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{spec_path}: not valid JSON ({error})") from None
    model_cfg = spec.get("model_cfg", spec)
    vision = model_cfg.get("vision_cfg") or {}
    if "head.weight" in state and "head.bias" not in state:
        state["head.bias"] = torch.zeros(state["head.weight"].shape[0])  # timm's head layout
    if layout == "timm":
        hints = timm_hints(str(vision.get("timm_model_name", "")))
        hints["head_kind"] = "projection"
        pool = {"map": "map", "avg": "mean", "token": "cls"}.get(vision.get("timm_pool") or "")
        config = config_from_state(state, where, pool=pool, **hints)
    else:
        width = int(state["patch_embed.proj.weight"].shape[0])
        heads = vision.get("heads") or width // int(vision.get("head_width", 64))
        pool = {"tok": "cls", "avg": "mean"}.get(vision.get("pool_type", "tok"))
        if pool is None or vision.get("final_ln_after_pool") or vision.get("attentional_pool"):
            raise CheckpointError(
                f"{where}: OpenCLIP pooling {vision.get('pool_type')!r} with these options is "
                "not supported; supported: the class token or the average after ln_post"
            )
        config = config_from_state(
            state,
            where,
            num_heads=int(heads),
            act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
            ln_eps=1e-5,
            pool=pool,
            head_kind="projection",
            pos_resample="bicubic",
            family="clip",
        )
    model = _build(state, config, where)
    recipe = spec.get("preprocess_cfg") or {}
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
