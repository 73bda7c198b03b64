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

from ..errors import CheckpointError
from ..model import ViTConfig
from .files import read_json
from .format import ModelBundle, build_model, checkpoint_bundle
from .limits import check_config
from .readers import read_safetensors, read_torch_pickle
from .recipes import preprocess_from_hf

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
            "patch_size": square_patch(config.get("patch_size", 16), where),
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


def square_patch(value, where: str):
    """HF allows a patch size as an int or a pair; ours is square (checked by check_config)."""
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
    return checkpoint_bundle(
        model,
        labels,
        preprocess,
        "hf",
        reference,
        {"weights_file": weights_name, "dropped": sorted(dropped)},
        notes,
        features_only=None
        if num_classes
        else "no classifier in this checkpoint (a bare ViTModel): features only",
    )
