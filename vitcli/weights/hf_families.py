"""transformers folders of the ViT families: DeiT, DINOv2 (with registers), CLIP and SigLIP.

One file of ~410 lines on purpose: the four key maps share the same renaming helpers and are
best compared side by side.

Each model_type is a handful of ViTConfig flags plus renames onto timm's (our) tensor names.
Both the on-disk names that save_pretrained writes (`encoder.layer.{i}.attention.attention.query`,
`mlp.weights_in`, ...) and the transformers-5 in-memory spellings (`attention.q_proj`,
`mlp.gate_proj`, ...) are read. A full CLIPModel or SiglipModel folder gives its vision tower;
the text tower is dropped. Position tables are resampled with transformers' own rule for each
model (bicubic without antialiasing, except DINOv2 with registers), so a non-native input size
gives the numbers transformers gives.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model import ViTConfig
from .format import FEATURES_ONLY, ModelBundle, build_model, checkpoint_bundle
from .hf import (
    HF_ACTS,
    _stack_qkv,
    labels_from_hf,
    load_hf_folder,
    read_hf_weights,
    square_patch,
)
from .limits import check_config, whole
from .recipes import preprocess_from_hf

FAMILY_TYPES = (
    "deit",
    "dinov2",
    "dinov2_with_registers",
    "clip",
    "clip_vision_model",
    "siglip",
    "siglip_vision_model",
)
# model_type -> what it is, for a one-line refusal that names the family.
UNSUPPORTED_TYPES = {
    "beit": "BEiT (relative position bias)",
    "data2vec-vision": "data2vec-vision (BEiT relative position bias)",
    "swin": "Swin (shifted windows)",
    "swinv2": "Swin V2 (shifted windows)",
    "dinov3_vit": "DINOv3 (RoPE)",
    "eva": "EVA (RoPE)",
    "vit_mae": "ViT-MAE (masked-autoencoder pre-training with its decoder)",
    "vit_hybrid": "ViT hybrid (ResNet stem)",
    "dpt": "DPT (dense prediction)",
    "siglip2_vision_model": "SigLIP 2 NaFlex (variable patch grids)",
    "siglip2": "SigLIP 2 NaFlex (variable patch grids)",
    "levit": "LeViT (convolutional stages)",
    "mobilevit": "MobileViT (convolutional stages)",
    "pvt": "PVT (pyramid stages)",
}
SUPPORTED_TEXT = (
    "ViT, DeiT, DINO, DINOv2 (with registers), CLIP and SigLIP vision towers, "
    "as transformers, timm, OpenCLIP or original DINO/DINOv2 checkpoints"
)

_PREFIXES = ("deit.", "dinov2.", "dinov2_with_registers.", "vision_model.", "vit.")
_BLOCK_KEY = re.compile(r"^encoder\.layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
# Per-block module paths, every spelling -> ours; q/k/v and gate/up are fused afterwards.
_BLOCK_RENAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "self_attn.out_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",  # DINOv2 SwiGLU on disk: [gate; up] packed like ours
    "mlp.weights_out": "mlp.fc2",
    "mlp.down_proj": "mlp.fc2",
}
_FUSED = {
    "attention.attention.query": ("qkv", 0),
    "attention.attention.key": ("qkv", 1),
    "attention.attention.value": ("qkv", 2),
    "attention.q_proj": ("qkv", 0),
    "attention.k_proj": ("qkv", 1),
    "attention.v_proj": ("qkv", 2),
    "self_attn.q_proj": ("qkv", 0),
    "self_attn.k_proj": ("qkv", 1),
    "self_attn.v_proj": ("qkv", 2),
    "mlp.gate_proj": ("fc1", 0),
    "mlp.up_proj": ("fc1", 1),
}
_FUSED_NAMES = {"qkv": ("attn.qkv", 3), "fc1": ("mlp.fc1", 2)}
_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding.weight": "pos_embed",
    "pre_layrnorm.weight": "norm_pre.weight",  # sic: transformers' CLIP spelling
    "pre_layrnorm.bias": "norm_pre.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
    "cls_classifier.weight": "head.weight",
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
    "head.probe": "attn_pool.latent",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
    "visual_projection.weight": "head.weight",
}
# Not part of the vision network: DeiT/ViT poolers (dense + tanh), the masked-image token,
# CLIP's position ids, the text tower and the contrastive scale of a full CLIP/SigLIP folder.
_DROPPED = re.compile(
    r"^(pooler\.|embeddings\.mask_token$|embeddings\.position_ids$|text_model\.|"
    r"text_projection\.|logit_scale$|logit_bias$)"
)


def hf_family_to_timm(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a transformers DeiT/DINOv2/CLIP/SigLIP state dict to our names; (state, dropped)."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    fused: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if _DROPPED.match(name):
            dropped.append(key)
            continue
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = tensor
            continue
        if name in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
            # nn.MultiheadAttention packs [q; k; v]: the probe's query, then the tokens' k, v.
            kind = "weight" if name.endswith("weight") else "bias"
            if tensor.ndim == 0 or tensor.shape[0] % 3:
                raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}, not [q; k; v]")
            width = tensor.shape[0] // 3
            out[f"attn_pool.q.{kind}"] = tensor[:width]
            out[f"attn_pool.kv.{kind}"] = tensor[width:]
            continue
        match = _BLOCK_KEY.match(name)
        if match:
            index, module, kind = int(match.group(1)), match.group(2), match.group(3)
            if kind == "lambda1" and module in ("layer_scale1", "layer_scale2"):
                out[f"blocks.{index}.ls{module[-1]}.gamma"] = tensor
                continue
            if module in _FUSED:
                target, part = _FUSED[module]
                fused.setdefault((index, target, kind), {})[part] = tensor
                continue
            if module in _BLOCK_RENAMES:
                out[f"blocks.{index}.{_BLOCK_RENAMES[module]}.{kind}"] = tensor
                continue
        out[key] = tensor  # unknown: kept so that loading names it
    for (index, target, kind), parts in fused.items():
        ours, count = _FUSED_NAMES[target]
        if sorted(parts) == list(range(count)):
            out[f"blocks.{index}.{ours}.{kind}"] = _stack_qkv(
                [parts[i] for i in range(count)], f"block {index} {target} {kind} parts"
            )
        else:  # incomplete: keep the pieces so that the error names them
            for part, tensor in parts.items():
                out[f"blocks.{index}.{ours}_part{part}.{kind}"] = tensor
    return out, dropped


# transformers' config-class defaults: older config.json files leave out what equals them.
_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_channels=3, image_size=224
)
_DEFAULTS = {
    "deit": dict(_BASE, intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12,
                 patch_size=16),
    "dinov2": dict(_BASE, mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, patch_size=14,
                   layerscale_value=1.0),
    "dinov2_with_registers": dict(_BASE, mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6,
                                  patch_size=16, layerscale_value=1.0, num_register_tokens=4),
    "clip": dict(_BASE, intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 patch_size=32),
    "siglip": dict(_BASE, intermediate_size=3072, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, patch_size=16),
}  # fmt: skip


def _vision_config(config: dict, where: str) -> dict:
    """The vision part of a config over its class defaults; `vision_config` of a full CLIP or
    SigLIP folder."""
    model_type = config.get("model_type", "")
    if model_type in ("clip", "siglip"):
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointError(f"{where}: a {model_type} folder without vision_config")
    else:
        vision = config
    return {**_DEFAULTS[model_type.removesuffix("_vision_model")], **vision}


# Our config fields -> the keys of a family's config.json, so errors name what the user sees.
HF_FAMILY_NAMES = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "in_channels": "num_channels",
    "width": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_dim": "intermediate_size (or hidden_size x mlp_ratio)",
    "ln_eps": "layer_norm_eps",
    "layer_scale": "layerscale_value",
    "reg_tokens": "register_tokens rows",
    "num_classes": "classifier.weight rows",
    "qkv_bias": "qkv_bias",
}


def _rows(tensor: torch.Tensor | None, dim: int = 0) -> int:
    """A tensor's size along `dim` (0 when absent or too few dimensions): a header's claim."""
    return int(tensor.shape[dim]) if tensor is not None and tensor.ndim > dim else 0


def config_from_hf_family(
    config: dict, state: dict[str, torch.Tensor], where: str
) -> tuple[ViTConfig, list[str]]:
    """Our ViTConfig for a transformers family folder; tensor shapes settle what configs omit.

    Every number is checked (limits.check_config) before a model could be built from it.
    """
    model_type = config.get("model_type", "")
    vision = _vision_config(config, where)
    act = vision["hidden_act"]
    if not isinstance(act, str) or (act not in HF_ACTS and act != "quick_gelu"):
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported")
    swiglu = bool(vision.get("use_swiglu_ffn", False))
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        mlp_dim: object = _rows(fc1) // (2 if swiglu else 1)
    elif vision.get("intermediate_size"):
        mlp_dim = vision["intermediate_size"]
    else:
        width = whole(vision["hidden_size"], "hidden_size", where)
        ratio = vision.get("mlp_ratio")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1e3:
            raise CheckpointError(f"{where}: config field mlp_ratio = {ratio!r} is not usable")
        mlp_dim = int(width * ratio)
    num_classes = _rows(state.get("head.weight"))
    notes: list[str] = []
    fields: dict = dict(
        image_size=vision["image_size"],
        patch_size=square_patch(vision["patch_size"], where),
        in_channels=vision["num_channels"],
        num_classes=num_classes,
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        mlp_dim=mlp_dim,
        qkv_bias=vision.get("qkv_bias", True),
        ln_eps=vision["layer_norm_eps"],
        act="quick_gelu" if act == "quick_gelu" else HF_ACTS[act],
        pos_resample="bicubic",  # transformers' interpolate_pos_encoding: no antialiasing
    )
    if model_type == "deit":
        distilled = "head_dist.weight" in state
        fields.update(dist_token=True, pool="dist" if distilled else "cls", family="deit")
    elif model_type in ("dinov2", "dinov2_with_registers"):
        registers = _rows(state.get("reg_token"), dim=1)
        declared = vision.get("num_register_tokens")
        if model_type == "dinov2_with_registers" and declared is not None:
            declared = check_config(
                {"reg_tokens": declared}, where, names={"reg_tokens": "num_register_tokens"}
            )["reg_tokens"]
            if declared != registers:
                raise CheckpointError(
                    f"{where}: config field num_register_tokens = {declared} but the weights "
                    f"hold {registers} register tokens; download the model again"
                )
        fields.update(
            layer_scale=vision["layerscale_value"],
            act="swiglu" if swiglu else fields["act"],
            pool="cls+mean" if num_classes else "cls",
            family="dinov2",
        )
        if model_type == "dinov2_with_registers":
            # Registers get no position: the CLS row moves into the token (timm's conversion).
            fields.update(
                reg_tokens=registers,
                no_embed_class=True,
                pos_resample="bicubic-antialias",
                family="dinov2-reg",
            )
    elif model_type in ("clip", "clip_vision_model"):
        fields.update(pre_norm=True, patch_bias=False, family="clip")
        if num_classes:
            fields.update(head_kind="projection")
    else:  # siglip
        use_head = "attn_pool.latent" in state
        fields.update(class_token=False, pool="map" if use_head else "mean", family="siglip")
        if not use_head:
            notes.append("no attention-pooling head in this checkpoint: patch tokens averaged")
    fields = check_config(fields, where, names=HF_FAMILY_NAMES)
    try:
        return ViTConfig(**fields), notes
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: unusable {model_type} config ({error})") from None


def _fit_state(state: dict[str, torch.Tensor], vit_config: ViTConfig) -> None:
    """Shape fixes between transformers' layouts and ours, in place; on meta tensors (shapes
    from headers) too, where nothing is computed."""
    width = vit_config.width
    cls = state.get("cls_token")
    if cls is not None and cls.ndim == 1 and cls.shape[0] == width:  # CLIP's class_embedding
        state["cls_token"] = cls.reshape(1, 1, width)
    if "pos_embed" in state and state["pos_embed"].ndim == 2:  # nn.Embedding weight (T, D)
        state["pos_embed"] = state["pos_embed"].unsqueeze(0)
    pos, cls = state.get("pos_embed"), state.get("cls_token")
    if (
        vit_config.no_embed_class
        and pos is not None
        and cls is not None
        and pos.ndim == 3
        and pos.shape[1] > 1
        and pos.shape[2] == cls.shape[-1]
    ):
        # DINOv2 with registers adds pos row 0 to CLS before the registers go in: fold it.
        state["cls_token"] = cls if cls.is_meta else cls + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    if vit_config.head_kind == "projection" and "head.bias" not in state:
        # CLIP's projection has no bias; a zero one keeps timm's head layout.
        meta = state["head.weight"].is_meta
        state["head.bias"] = torch.zeros(vit_config.num_classes, device="meta" if meta else None)


def load_hf_family(path: Path, config: dict, reference: str) -> ModelBundle:
    """A transformers DeiT, DINOv2, CLIP or SigLIP folder (or full CLIP/SigLIP) as a bundle."""
    path = Path(path)
    where = str(path)
    raw, weights_name = read_hf_weights(path, meta=True)  # headers only
    weights_where = str(path / weights_name)
    try:
        state, dropped = hf_family_to_timm(raw)
    except CheckpointError as error:
        raise CheckpointError(f"{weights_where}: {error}") from None
    vit_config, notes = config_from_hf_family(config, state, where)
    _fit_state(state, vit_config)

    def read() -> dict[str, torch.Tensor]:
        real, _ = hf_family_to_timm(read_hf_weights(path)[0])
        _fit_state(real, vit_config)
        return real

    model = build_model(vit_config, state, weights_where, read=read)
    projection = vit_config.head_kind == "projection"
    num_labels = 0 if projection else vit_config.num_classes
    labels = (
        [f"dim_{i}" for i in range(vit_config.num_classes)]
        if projection
        else labels_from_hf(config, num_labels, where)
    )
    preprocess, preprocess_notes = preprocess_from_hf(path, vit_config.image_size)
    extra = {"weights_file": weights_name, "family": vit_config.family, "dropped": sorted(dropped)}
    return checkpoint_bundle(
        model,
        labels,
        preprocess,
        "hf",
        reference,
        extra,
        notes + preprocess_notes,
        features_only=FEATURES_ONLY if vit_config.num_classes == 0 or projection else None,
    )


def refuse_unsupported_hf(config: dict, where: str) -> None:
    """Raise a one-line CheckpointError for a transformers model_type we do not build."""
    model_type = str(config.get("model_type", ""))
    if model_type in UNSUPPORTED_TYPES:
        family = UNSUPPORTED_TYPES[model_type]
        raise CheckpointError(f"{where}: {family} is not supported; supported: {SUPPORTED_TEXT}")


def load_hf(path: Path, config: dict, reference: str) -> ModelBundle:
    """The one transformers loader: a ViT (hf.py's key map) or a family model (this module's),
    from a model folder whose config.json is `config`."""
    config_path = Path(path) / "config.json"
    if config.get("model_type") in FAMILY_TYPES:
        return load_hf_family(path, config, reference=reference)
    refuse_unsupported_hf(config, str(config_path))
    if config.get("model_type") == "vit" or "hidden_size" in config:
        return load_hf_folder(path, config, reference=reference)
    raise CheckpointError(
        f"{config_path}: not a ViT config "
        "(neither transformers' model_type 'vit' nor timm's 'architecture')"
    )
