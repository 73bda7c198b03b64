"""Hugging Face transformers ViT folders: config.json + model.safetensors (or pytorch_model.bin).

Three spellings of the same tensors are accepted and renamed to timm's (our) names:
- legacy on-disk names, which transformers still writes:
  `vit.encoder.layer.{i}.attention.attention.query.weight`, `...intermediate.dense`, ...
- transformers-5 in-memory names, found in a live model's `state_dict()`:
  `vit.layers.{i}.attention.q_proj.weight`, `...o_proj`, `...mlp.fc1`, ...
- either of them without the `vit.` prefix (a bare ViTModel file).
The pooler of a ViTModel is not part of a classifier and is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..data.preprocess import PIL_RESAMPLE, Preprocess
from ..errors import CheckpointError, VitError
from ..model import ViTConfig
from .format import ModelBundle, build_model
from .limits import check_config
from .readers import read_json, read_safetensors, read_torch_pickle

__all__ = ["load_hf_folder", "read_hf_weights"]

# transformers' hidden_act -> our act. "gelu" is erf GELU; the other three are the tanh form.
HF_ACTS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}

# Per-block renames, legacy and transformers-5 spellings -> timm. q/k/v are fused separately.
_BLOCK_RENAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",  # legacy
    "attention.o_proj": "attn.proj",  # transformers 5
    "intermediate.dense": "mlp.fc1",  # legacy
    "output.dense": "mlp.fc2",  # legacy
    "mlp.fc1": "mlp.fc1",  # transformers 5
    "mlp.fc2": "mlp.fc2",
}
_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Our config fields -> transformers' config.json keys, so errors name what the user sees.
HF_NAMES = {
    "image_size": "image_size",
    "in_channels": "num_channels",
    "width": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_dim": "intermediate_size",
    "ln_eps": "layer_norm_eps",
    "num_classes": "classifier.weight rows",
}
_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an HF ViT state dict to timm names; returns (state, dropped key names).

    Keys that match no known spelling keep their name, so that loading reports them as
    unexpected instead of silently losing them.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key[len("vit.") :] if key.startswith("vit.") else key
        if name.startswith("pooler.") or name == "embeddings.mask_token":
            dropped.append(
                key
            )  # ViTModel's pooler / masked-image-modeling token: not a classifier's
            continue
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = tensor
            continue
        match = _BLOCK_KEY.match(name)
        if match:
            index, module, kind = int(match.group(1)), match.group(2), match.group(3)
            if module in _QKV:
                qkv.setdefault((index, kind), {})[_QKV[module]] = tensor
                continue
            if module in _BLOCK_RENAMES:
                out[f"blocks.{index}.{_BLOCK_RENAMES[module]}.{kind}"] = tensor
                continue
        out[key] = tensor
    for (index, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{index}.attn.qkv.{kind}"] = _stack_qkv(
                [parts["q"], parts["k"], parts["v"]], f"block {index} q/k/v {kind}"
            )
        else:  # incomplete: keep the pieces so the error names them
            for part, tensor in parts.items():
                out[f"blocks.{index}.attn.{part}_proj.{kind}"] = tensor
    return out, dropped


def _stack_qkv(parts: list[torch.Tensor], what: str) -> torch.Tensor:
    """torch.cat(parts, dim=0), checked; on meta tensors (shapes only) without torch.cat,
    whose meta kernel would import torch._dynamo (seconds) on first use."""
    if len({tuple(part.shape[1:]) for part in parts}) != 1 or any(p.ndim == 0 for p in parts):
        shapes = ", ".join(str(tuple(part.shape)) for part in parts)
        raise CheckpointError(f"{what} have shapes {shapes} that do not stack")
    if any(part.is_meta for part in parts):
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        return torch.empty(shape, dtype=parts[0].dtype, device="meta")
    return torch.cat(parts, dim=0)


def read_hf_weights(path: Path, meta: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The raw tensors of an HF folder and the file they came from (meta: shapes only)."""
    single = path / "model.safetensors"
    if single.exists():
        tensors, _ = read_safetensors(single, meta=meta)
        return tensors, single.name
    index = path / "model.safetensors.index.json"
    if index.exists():
        tensors = {}
        for shard in shard_names(index):
            tensors.update(read_safetensors(path / shard, meta=meta)[0])
        return tensors, index.name
    binary = path / "pytorch_model.bin"
    if binary.exists():
        return read_torch_pickle(binary, meta=meta), binary.name
    raise CheckpointError(
        f"{path}: no model.safetensors or pytorch_model.bin in this folder; "
        "download the weights too"
    )


def shard_names(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names: plain file names in its folder.

    A name with a folder part (`../x`, `/dev/zero`, `sub/x`) is refused, never opened.
    """
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: broken shard index (no weight_map of tensor -> file); "
            "download the model again"
        )
    shards = set()
    for shard in weight_map.values():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{index}: broken shard index (shard name {shard!r} is not a string); "
                "download the model again"
            )
        if (
            shard in ("", ".", "..")
            or Path(shard).name != shard
            or any(char in shard for char in "/\\\0")
        ):
            raise CheckpointError(
                f"{index}: shard {shard!r} is not a file name in the model folder; "
                "refused (download the model again)"
            )
        shards.add(shard)
    return sorted(shards)


def config_from_hf(config: dict, num_classes: int, where: str) -> ViTConfig:
    act = config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in HF_ACTS:
        raise CheckpointError(
            f"{where}: hidden_act {act!r} is not supported; use one of {', '.join(HF_ACTS)}"
        )
    fields = check_config(
        {
            "image_size": config.get("image_size", 224),
            "patch_size": _first(config.get("patch_size", 16), where),
            "in_channels": config.get("num_channels", 3),
            "num_classes": num_classes,
            "width": config.get("hidden_size", 768),
            "depth": config.get("num_hidden_layers", 12),
            "num_heads": config.get("num_attention_heads", 12),
            "mlp_dim": config.get("intermediate_size", 3072),
            "qkv_bias": config.get("qkv_bias", True),
            "ln_eps": config.get("layer_norm_eps", 1e-12),  # HF's default, kept as the source says
            "act": HF_ACTS[act],
        },
        where,
        names=HF_NAMES,
    )
    try:
        return ViTConfig(**fields, pos_resample="bicubic")  # transformers: no antialiasing
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: unusable ViT config ({error})") from None


def _first(value, where: str):
    """HF allows patch_size as an int or a pair; ours is square."""
    if isinstance(value, (list, tuple)):
        if len(value) not in (1, 2) or value[0] != value[-1]:
            raise CheckpointError(f"{where}: patch size {value} is not supported (square only)")
        return value[0]
    return value


def labels_from_hf(config: dict, num_classes: int, where: str) -> list[str]:
    id2label = config.get("id2label") or {}
    if num_classes == 0:
        return []
    if not id2label:
        return [f"class_{i}" for i in range(num_classes)]
    try:
        labels = {int(key): value for key, value in id2label.items()}
    except (ValueError, TypeError, AttributeError):
        raise CheckpointError(f"{where}: id2label keys must be class indices") from None
    if sorted(labels) != list(range(num_classes)):
        raise CheckpointError(
            f"{where}: id2label has {len(labels)} entries "
            f"but the classifier has {num_classes} classes"
        )
    odd = [index for index, value in labels.items() if not isinstance(value, str)]
    if odd:
        raise CheckpointError(
            f"{where}: id2label value for class {odd[0]} is {labels[odd[0]]!r}, "
            "not a class name (string)"
        )
    return [labels[i] for i in range(num_classes)]


def preprocess_from_hf(folder: Path, image_size: tuple[int, int]) -> tuple[Preprocess, list[str]]:
    """Preprocessing from preprocessor_config.json, else ViTImageProcessor's defaults.

    Returns the recipe and notes about anything our Preprocess can only approximate.
    """
    notes: list[str] = []
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        notes.append(
            "no preprocessor_config.json: ViTImageProcessor defaults (squash, bilinear, 0.5/0.5)"
        )
        return Preprocess(size=image_size, resize="squash", interpolation="bilinear"), notes
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return _preprocess_from_spec(spec, image_size)
    except VitError as error:  # InputError from Preprocess' own checks
        raise CheckpointError(f"{path}: unusable preprocessing ({error})") from None
    except (ValueError, TypeError, ArithmeticError, AttributeError, KeyError) as error:
        raise CheckpointError(f"{path}: unusable preprocessing ({error})") from None


def _preprocess_from_spec(spec: dict, image_size: tuple[int, int]) -> tuple[Preprocess, list[str]]:
    notes: list[str] = []
    resample = spec.get("resample", 2)
    if isinstance(resample, int) and not isinstance(resample, bool):
        if resample not in PIL_RESAMPLE:
            raise ValueError(f"resample {resample} is not a PIL filter (0..5)")
        interpolation = PIL_RESAMPLE[resample]
    else:
        interpolation = resample  # a name, checked by Preprocess
    if spec.get("do_normalize", True):
        mean = spec.get("image_mean", (0.5, 0.5, 0.5))
        std = spec.get("image_std", (0.5, 0.5, 0.5))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if (
        not spec.get("do_rescale", True)
        or abs(float(spec.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9
    ):
        notes.append("rescale other than x/255 is not supported; x/255 is used")
    if not spec.get("do_resize", True):
        notes.append("do_resize is false in the source; images are squashed to the model size")
    size = spec.get("size", image_size)
    crop = spec.get("crop_size")
    do_crop = bool(spec.get("do_center_crop", False)) and crop is not None
    crop_hw = _hw(crop, image_size) if do_crop else None
    fields: dict = dict(interpolation=interpolation, mean=tuple(mean), std=tuple(std))
    if isinstance(size, dict) and "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if "crop_pct" in spec and spec["crop_pct"] is not None:
            # ConvNeXt style: shorter side to edge / crop_pct, then center crop edge.
            fields.update(size=(edge, edge), resize="shorter", crop_pct=float(spec["crop_pct"]))
        elif crop_hw is not None:
            fields.update(size=crop_hw, resize="shorter", crop_pct=min(1.0, crop_hw[0] / edge))
        else:
            notes.append(
                "shortest_edge resize without a crop is approximated by a center crop to a square"
            )
            fields.update(size=(edge, edge), resize="shorter", crop_pct=1.0)
    else:
        height, width = _hw(size, image_size)
        if crop_hw is not None and crop_hw != (height, width):
            # DeiT style: squash to 256x256 then crop 224; shorter-side resize is the same on
            # square photos and close otherwise.
            notes.append(
                f"squash to {height}x{width} then crop {crop_hw[0]}x{crop_hw[1]} is "
                "approximated by a shorter-side resize and center crop"
            )
            fields.update(size=crop_hw, resize="shorter", crop_pct=min(1.0, crop_hw[0] / height))
        else:
            fields.update(size=(height, width), resize="squash")
    return Preprocess(**fields), notes


def _hw(value, default: tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
        return default
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return default


def load_hf_folder(path: Path, config: dict, reference: str) -> ModelBundle:
    """A transformers ViTForImageClassification (or bare ViTModel) folder as a ModelBundle.

    Shapes come from the weights' headers first; tensor data is read only once the config
    and every shape have been checked (format.build_model).
    """
    path = Path(path)
    where = str(path)
    raw, weights_name = read_hf_weights(path, meta=True)
    try:
        state, dropped = hf_to_timm(raw)
    except CheckpointError as error:
        raise CheckpointError(f"{path / weights_name}: {error}") from None
    head = state.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    vit_config = config_from_hf(config, num_classes, where)
    labels = labels_from_hf(config, num_classes, where)
    preprocess, notes = preprocess_from_hf(path, vit_config.image_size)
    model = build_model(
        vit_config,
        state,
        str(path / weights_name),
        read=lambda: hf_to_timm(read_hf_weights(path)[0])[0],
    )
    extra: dict = {"weights_file": weights_name}
    if dropped:
        extra["dropped"] = sorted(dropped)
    if notes:
        extra["preprocess_notes"] = notes
    if num_classes == 0:
        extra["note"] = "no classifier in this checkpoint (a bare ViTModel): features only"
    return ModelBundle(
        model=model,
        labels=labels,
        preprocess=preprocess,
        source_format="hf",
        reference=reference,
        extra=extra,
    )
