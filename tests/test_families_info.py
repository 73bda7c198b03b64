"""`vit info` shows a model's family (prefix tokens, pooling, layer scale, embedding size) in
the table and in --json; a hub id whose repo holds only an OpenCLIP release loads from the cache."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import populate_hub_cache
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.model import ViT, ViTConfig
from vitcli.weights.format import save_model
from vitcli.weights.resolve import load_model

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)


def _info(*args) -> str:
    result = CliRunner().invoke(app, ["info", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_info_shows_a_register_model_family(tmp_path):
    config = ViTConfig(
        **TINY, num_classes=0, reg_tokens=4, no_embed_class=True, layer_scale=1e-5,
        family="dinov2-reg", pos_resample="bicubic-antialias",
    )  # fmt: skip
    path = save_model(ViT(config), tmp_path / "reg.safetensors")
    text = " ".join(_info(path).split())
    assert "family dinov2-reg" in text
    assert "prefix tokens 5 (CLS + 4 registers)" in text
    assert "layer scale on (init 1e-05)" in text
    assert "embedding size 32 (vit embed)" in text
    assert "pooling CLS token" in text
    data = json.loads(CliRunner().invoke(app, ["info", str(path), "--json"]).output)
    family = data["family"]
    assert family["family"] == "dinov2-reg" and family["prefix_tokens"] == 5
    assert family["layer_scale"] == 1e-5 and family["embedding_dim"] == 32
    assert data["preprocess"]["size"] == [32, 32]


def test_info_shows_a_projection_head_and_the_plain_vit(tmp_path):
    clip = ViTConfig(
        **TINY, num_classes=16, head_kind="projection", pre_norm=True, patch_bias=False,
        act="quick_gelu", family="clip",
    )  # fmt: skip
    text = " ".join(_info(save_model(ViT(clip), tmp_path / "clip.safetensors")).split())
    assert "embedding size 16" in text and "projection to 16 dimensions" in text
    assert "LN before the blocks" in text and "QuickGELU" in text
    plain = ViTConfig(**TINY, num_classes=3)
    text = " ".join(_info(save_model(ViT(plain), tmp_path / "vit.safetensors")).split())
    assert "family vit" in text and "prefix tokens 1 (CLS)" in text and "layer scale off" in text


_OPENAI = (  # our names -> OpenCLIP's OpenAI-layout names (inverse of weights/originals.py)
    ("patch_embed.proj.", "conv1."),
    ("norm_pre.", "ln_pre."),
    ("blocks.", "transformer.resblocks."),
    (".norm1.", ".ln_1."),
    (".norm2.", ".ln_2."),
    (".attn.qkv.", ".attn.in_proj_"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)


def _openclip_file(model: ViT) -> bytes:
    from safetensors.torch import save

    state = {}
    for name, tensor in model.state_dict().items():
        if name == "head.bias":
            continue  # OpenAI's projection has none
        if name == "head.weight":
            state["visual.proj"] = tensor.t().contiguous()
            continue
        if name == "cls_token":
            state["visual.class_embedding"] = tensor.reshape(-1)
            continue
        if name == "pos_embed":
            state["visual.positional_embedding"] = tensor[0]
            continue
        if name.startswith("norm."):
            name = "ln_post." + name.removeprefix("norm.")
        for ours, theirs in _OPENAI:
            name = name.replace(ours, theirs)
        state["visual." + name] = tensor
    state["text_projection"] = torch.zeros(8, 8)  # a text tower part: dropped
    return save(state)


def test_openclip_only_hub_repo_loads_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    config = ViTConfig(
        **TINY, num_classes=16, head_kind="projection", pre_norm=True, patch_bias=False,
        ln_eps=1e-5, pos_resample="bicubic", family="clip",
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
        model.head.bias.zero_()
    spec = {"model_cfg": {"vision_cfg": {"width": 32, "heads": 4, "patch_size": 8}}}
    snapshot = populate_hub_cache(
        cache,
        "tiny-org/tiny-openclip",
        {
            "open_clip_config.json": json.dumps(spec).encode(),
            "open_clip_model.safetensors": _openclip_file(model),
        },
    )
    from vitcli.weights.hub import download

    assert download("tiny-org/tiny-openclip") == snapshot
    bundle = load_model("tiny-org/tiny-openclip")
    assert bundle.source_format == "openclip" and bundle.config.family == "clip"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.embed(x), model.embed(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["open_clip_config.json", "open_clip_*.safetensors"])
def test_hub_patterns_fetch_openclip_files(name):
    from vitcli.weights import hub

    assert name in hub.CONFIG_FILES + hub.SAFETENSORS_FILES
