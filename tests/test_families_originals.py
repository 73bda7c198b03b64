"""Original releases: DINOv2 hub .pth (checked against transformers' Dinov2, same network), DINO
.pth, OpenCLIP OpenAI layout (checked against transformers' CLIP) and timm-trunk layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from checkpoints import randomised, tiny_config

from vitcli.errors import CheckpointError
from vitcli.weights.resolve import load_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# 64-wide heads, as every original release has: their files do not store the head count.
SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32)


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 1.0 if "position" in name else 0.2)
    return model.eval()


def _disk_state(model, folder) -> dict:
    """The tensors as save_pretrained writes them (the names on the hub, not in memory)."""
    from safetensors.torch import load_file

    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def _dinov2_original_names(hf_state: dict) -> dict:
    """transformers Dinov2 tensors under the names of facebookresearch/dinov2's checkpoints."""
    out, qkv = {}, {}
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "layer_scale1": "ls1",
        "layer_scale2": "ls2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.weights_in": "mlp.w12",
        "mlp.weights_out": "mlp.w3",
    }
    for key, tensor in hf_state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        _, _, index, rest = key.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        kind = "gamma" if kind == "lambda1" else kind
        if module.startswith("attention.attention."):
            qkv.setdefault((index, kind), {})[module.rsplit(".", 1)[1]] = tensor
        else:
            out[f"blocks.{index}.{block[module]}.{kind}"] = tensor
    for (index, kind), parts in qkv.items():
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]]
        )
    return out


def _dinov2_offset_table(pos_embed, grid):
    """facebookresearch/dinov2 interpolate_pos_encoding, interpolate_offset=0.1 (its default)."""
    patch_pos = pos_embed[:, 1:]
    side = int(math.sqrt(patch_pos.shape[1]))
    sx, sy = (grid[0] + 0.1) / side, (grid[1] + 0.1) / side
    table = torch.nn.functional.interpolate(
        patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    return torch.cat(
        [pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, table.shape[1])], 1
    )


@pytest.mark.parametrize("kind", ["plain", "swiglu", "registers"])
def test_dinov2_hub_pth_matches_transformers(tmp_path, kind):
    T = transformers
    fields = dict(
        SMALL, patch_size=8, mlp_ratio=2, layer_norm_eps=1e-6, attn_implementation="eager"
    )
    if kind == "registers":
        reference = T.Dinov2WithRegistersModel(
            T.Dinov2WithRegistersConfig(**fields, num_register_tokens=2)
        )
    else:
        reference = T.Dinov2Model(T.Dinov2Config(**fields, use_swiglu_ffn=kind == "swiglu"))
    _randomise(reference)
    state = _dinov2_original_names(_disk_state(reference, tmp_path / "hf"))
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    bundle = load_model(str(tmp_path / "dinov2_vits14_pretrain.pth"))
    model, config = bundle.model, bundle.config
    assert config.family == ("dinov2-reg" if kind == "registers" else "dinov2")
    assert config.act == ("swiglu" if kind == "swiglu" else "gelu")
    assert "mask_token" in bundle.extra["dropped"]
    # transformers' Dinov2 with registers resamples as the original does (antialias, no offset).
    sizes = [(32, 32), (24, 48)] if kind == "registers" else [(32, 32)]
    for size in sizes:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = reference(pixel_values=x, output_attentions=True)
            _, weights = model.forward_with_attention(x, layers=[0, 1])
            tokens, _ = model.forward_features(x)
        torch.testing.assert_close(tokens, expected.last_hidden_state, atol=TOL, rtol=0)
        for layer in (0, 1):
            torch.testing.assert_close(weights[layer], expected.attentions[layer], atol=TOL, rtol=0)
    if kind != "registers":
        # The original's offset rule at a non-native, non-square grid.
        expected = _dinov2_offset_table(state["pos_embed"], (3, 6))
        with torch.no_grad():
            torch.testing.assert_close(model._pos_embed_for((3, 6)), expected, atol=1e-6, rtol=0)


def test_dino_training_checkpoint_teacher_and_release_pth(tmp_path):
    source = randomised(tiny_config(num_classes=0, ln_eps=1e-6, width=128, num_heads=2))
    backbone = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    head = {
        "module.head.mlp.0.weight": torch.zeros(8, 32),
        "module.head.last_layer.weight_g": torch.ones(1),
    }
    torch.save({"teacher": {**backbone, **head}, "epoch": 3}, tmp_path / "checkpoint.pth")
    torch.save(source.state_dict(), tmp_path / "dino_deitsmall8_pretrain.pth")
    x = torch.randn(1, 3, 32, 32)
    for name in ("checkpoint.pth", "dino_deitsmall8_pretrain.pth"):
        bundle = load_model(str(tmp_path / name))
        config = bundle.config
        assert (config.family, config.pos_resample) == ("dino", "bicubic-offset")
        assert config.num_classes == 0 and config.image_size == (32, 32)
        with torch.no_grad():
            torch.testing.assert_close(bundle.model.embed(x), source.embed(x), atol=0, rtol=0)
            # DINO's rule at a non-native grid: scale factor (n + 0.1) / n_old, as DINOv2's.
            table = bundle.model._pos_embed_for((3, 5))
        expected = _dinov2_offset_table(source.pos_embed.detach(), (3, 5))
        torch.testing.assert_close(table, expected, atol=1e-6, rtol=0)
    assert (
        any("head.mlp" in key for key in bundle.extra.get("dropped", []))
        or name != "checkpoint.pth"
    )


def test_pth_that_is_no_backbone_or_has_code_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a ViT state dict"):
        load_model(str(tmp_path / "other.pth"))
    torch.save({"args": torch.nn.Linear(2, 2)}, tmp_path / "code.pth")  # a pickled module
    with pytest.raises(CheckpointError, match="cannot be read as plain tensors"):
        load_model(str(tmp_path / "code.pth"))


def _openai_names(hf_state: dict) -> dict:
    """transformers CLIPVisionModelWithProjection tensors in OpenAI CLIP's `visual.` layout."""
    out, qkv = {"token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.ones(())}, {}
    top = {
        "vision_model.embeddings.class_embedding": "class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "positional_embedding",
        "vision_model.pre_layrnorm.weight": "ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "ln_pre.bias",
        "vision_model.post_layernorm.weight": "ln_post.weight",
        "vision_model.post_layernorm.bias": "ln_post.bias",
    }
    block = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for key, tensor in hf_state.items():
        if key in top:
            out["visual." + top[key]] = tensor
        elif key == "visual_projection.weight":
            out["visual.proj"] = tensor.t()  # OpenAI applies x @ proj
        elif key.startswith("vision_model.encoder.layers."):
            index, rest = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module.startswith("self_attn.") and module[-6:] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((index, kind), {})[module[-6]] = tensor
            else:
                out[f"visual.transformer.resblocks.{index}.{block[module]}.{kind}"] = tensor
    for (index, kind), parts in qkv.items():
        out[f"visual.transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def test_openclip_openai_layout_matches_transformers_clip(tmp_path):
    from safetensors.torch import save_file

    T = transformers
    config = T.CLIPVisionConfig(
        **SMALL, patch_size=8, intermediate_size=64, projection_dim=16, attn_implementation="eager"
    )
    reference = _randomise(T.CLIPVisionModelWithProjection(config))
    state = _openai_names(_disk_state(reference, tmp_path / "hf"))
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, tmp_path / "open_clip_model.safetensors")
    spec = {
        "model_cfg": {
            "embed_dim": 16,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": 32,
                "layers": 2,
                "width": 128,
                "patch_size": 8,
            },
        },
        "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(spec))
    bundle = load_model(str(tmp_path))
    model = bundle.model
    assert bundle.source_format == "openclip" and bundle.config.head_kind == "projection"
    assert bundle.preprocess.mean == (0.1, 0.2, 0.3) and bundle.preprocess.resize == "shorter"
    for size in [(32, 32), (24, 48)]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = reference(
                pixel_values=x, output_attentions=True, interpolate_pos_encoding=size != (32, 32)
            )
            _, weights = model.forward_with_attention(x, layers=[0, 1])
            torch.testing.assert_close(model.embed(x), expected.image_embeds, atol=TOL, rtol=0)
        for layer in (0, 1):
            torch.testing.assert_close(weights[layer], expected.attentions[layer], atol=TOL, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_openclip_timm_trunk_siglip(tmp_path, projection):
    from safetensors.torch import save_file

    source = randomised(
        tiny_config(num_classes=0, class_token=False, pool="map", width=128, num_heads=2)
    )
    state = {f"visual.trunk.{k}": v for k, v in source.state_dict().items()}
    state["text.transformer.resblocks.0.ln_1.weight"] = torch.ones(8)
    proj = torch.randn(12, 128)
    if projection:
        state["visual.head.proj.weight"] = proj
    save_file(state, tmp_path / "open_clip_model.safetensors")
    spec = {
        "model_cfg": {
            "vision_cfg": {
                "timm_model_name": "vit_base_patch16_siglip_224",
                "timm_pool": "map",
                "timm_proj": "linear" if projection else "none",
            }
        },
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(spec))
    bundle = load_model(str(tmp_path / "open_clip_model.safetensors"))
    assert bundle.config.family == "siglip" and bundle.preprocess.resize == "squash"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source.embed(x)
        expected = expected @ proj.t() if projection else expected
        torch.testing.assert_close(bundle.model.embed(x), expected, atol=1e-5, rtol=0)
