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

import json
import re
from pathlib import Path

import torch

from ..data.preprocess import Preprocess
from ..errors import CheckpointError
from ..model import ViT, ViTConfig
from .format import ModelBundle, load_state, read_safetensors

# transformers' hidden_act -> our act. "gelu" is erf GELU; the other three are the tanh form.
HF_ACTS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# PIL resample integers as written by transformers' image processors.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

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
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
                [parts["q"], parts["k"], parts["v"]], dim=0
            )
        else:  # incomplete: keep the pieces so the error names them
            for part, tensor in parts.items():
                out[f"blocks.{index}.attn.{part}_proj.{kind}"] = tensor
    return out, dropped


def read_hf_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The raw tensors of an HF folder and the file they came from."""
    single = path / "model.safetensors"
    if single.is_file():
        tensors, _ = read_safetensors(single)
        return tensors, single.name
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise CheckpointError(
                f"{index}: broken shard index ({error}); download the model again"
            ) from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(read_safetensors(path / shard)[0])
        return tensors, index.name
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        return read_torch_pickle(binary), binary.name
    raise CheckpointError(
        f"{path}: no model.safetensors or pytorch_model.bin in this folder; download the weights too"
    )


def read_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, read with weights_only=True: no code from the file runs."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a plain torch state dict ({first}); "
            "it may be corrupt or contain code, use a .safetensors file instead"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def config_from_hf(config: dict, num_classes: int, where: str) -> ViTConfig:
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTS:
        raise CheckpointError(
            f"{where}: hidden_act {act!r} is not supported; use one of {', '.join(HF_ACTS)}"
        )
    try:
        return ViTConfig(
            image_size=config.get("image_size", 224),
            patch_size=int(_first(config.get("patch_size", 16))),
            in_channels=int(config.get("num_channels", 3)),
            num_classes=num_classes,
            width=int(config.get("hidden_size", 768)),
            depth=int(config.get("num_hidden_layers", 12)),
            num_heads=int(config.get("num_attention_heads", 12)),
            mlp_dim=int(config.get("intermediate_size", 3072)),
            qkv_bias=bool(config.get("qkv_bias", True)),
            ln_eps=float(
                config.get("layer_norm_eps", 1e-12)
            ),  # HF's default, kept as the source says
            act=HF_ACTS[act],
            pos_resample="bicubic",  # transformers' interpolate_pos_encoding: no antialiasing
        )
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{where}: unusable ViT config ({error})") from None


def _first(value):
    """HF allows patch_size as an int or a pair; ours is square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"non-square patch size {value} is not supported")
        return value[0]
    return value


def labels_from_hf(config: dict, num_classes: int, where: str) -> list[str]:
    id2label = config.get("id2label") or {}
    if num_classes == 0:
        return []
    if not id2label:
        return [f"class_{i}" for i in range(num_classes)]
    try:
        labels = {int(key): str(value) for key, value in id2label.items()}
    except (ValueError, AttributeError):
        raise CheckpointError(f"{where}: id2label keys must be class indices") from None
    if sorted(labels) != list(range(num_classes)):
        raise CheckpointError(
            f"{where}: id2label has {len(labels)} entries but the classifier has {num_classes} classes"
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
    try:
        spec = json.loads(path.read_text())
        if not isinstance(spec, dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    resample = spec.get("resample", 2)
    interpolation = PIL_RESAMPLE.get(
        resample, resample if isinstance(resample, str) else "bilinear"
    )
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
    fields: dict = dict(interpolation=interpolation, mean=mean, std=std)
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
                f"squash to {height}x{width} then crop {crop_hw[0]}x{crop_hw[1]} is approximated by "
                "a shorter-side resize and center crop"
            )
            fields.update(size=crop_hw, resize="shorter", crop_pct=min(1.0, crop_hw[0] / height))
        else:
            fields.update(size=(height, width), resize="squash")
    try:
        return Preprocess(**fields), notes
    except Exception as error:  # InputError from an odd interpolation or crop
        raise CheckpointError(f"{path}: unsupported preprocessing ({error})") from None


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
    """A transformers ViTForImageClassification (or bare ViTModel) folder as a ModelBundle."""
    path = Path(path)
    where = str(path)
    raw, weights_name = read_hf_weights(path)
    state, dropped = hf_to_timm(raw)
    head = state.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    vit_config = config_from_hf(config, num_classes, where)
    labels = labels_from_hf(config, num_classes, where)
    model = ViT(vit_config)
    load_state(model, state, f"{path / weights_name}")
    model.eval()
    preprocess, notes = preprocess_from_hf(path, vit_config.image_size)
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
