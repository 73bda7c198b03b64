"""timm's ViT families: folders (config.json `architecture` + model.safetensors) load with the
config read off the tensors and the name, and match timm's forward and every attention map; our
files load back into timm. The timm comparisons skip when timm cannot be imported (it needs
torchvision); the layout tests below them need no timm."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import randomised, tiny_config

from vitcli.errors import CheckpointError
from vitcli.weights.resolve import load_model

TOL = 1e-4
TINY = dict(embed_dim=32, depth=2, num_heads=4, img_size=32, patch_size=8)
# architecture -> (timm kwargs beyond TINY, pretrained tag, global_pool, expected family)
ARCHS = {
    "deit_tiny_distilled_patch16_224": (dict(num_classes=5), "fb_in1k", "token", "deit"),
    "deit3_small_patch16_224": (dict(num_classes=5), "fb_in1k", "token", "deit"),
    "vit_small_patch14_dinov2": (dict(num_classes=0), "lvd142m", "token", "dinov2"),
    "vit_small_patch14_reg4_dinov2": (dict(num_classes=0), "lvd142m", "token", "dinov2-reg"),
    "vit_giant_patch14_dinov2": (dict(num_classes=0), "lvd142m", "token", "dinov2"),
    "vit_base_patch16_clip_224": (dict(num_classes=16), "openai", "token", "clip"),
    "vit_base_patch16_clip_quickgelu_224": (dict(num_classes=16), "openai", "token", "clip"),
    "vit_base_patch16_clip_224.ft": (dict(num_classes=5), "openai_ft_in1k", "token", "clip"),
    "vit_base_patch16_siglip_224": (dict(num_classes=0), "webli", "map", "siglip"),
    "vit_base_patch16_siglip_gap_224": (dict(num_classes=0), "webli", "avg", "siglip"),
}


def write_timm_folder(folder, arch, state, *, num_classes, tag, global_pool, size=32):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    config = {
        "architecture": arch.split(".")[0],
        "num_classes": num_classes,
        "global_pool": global_pool,
        "model_args": {"num_heads": 4, "img_size": size},
        "pretrained_cfg": {"tag": tag, "input_size": [3, size, size], "crop_pct": 1.0},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _timm_model(arch, kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        arch.split(".")[0], pretrained=False, dynamic_img_size=True, **TINY, **kwargs
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 1.0 if "pos_embed" in name else 0.2)
    return model.eval()


def _timm_attention(model, x):
    """timm's forward with the explicit attention path, capturing each block's softmax."""
    captured = []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o)))
    try:
        out = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return out, captured


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_timm_families_match_timm(tmp_path, arch):
    kwargs, tag, pool, family = ARCHS[arch]
    reference = _timm_model(arch, kwargs)
    folder = write_timm_folder(
        tmp_path / "m",
        arch,
        reference.state_dict(),
        num_classes=kwargs["num_classes"],
        tag=tag,
        global_pool=pool,
    )
    bundle = load_model(str(folder))
    model, config = bundle.model, bundle.config
    assert config.family == family
    assert config.num_prefix_tokens == reference.num_prefix_tokens
    for size in [(32, 32), (24, 48)]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, attentions = _timm_attention(reference, x)
            ours, weights = model.forward_with_attention(x, layers=range(2))
        torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
        for layer in range(2):
            torch.testing.assert_close(weights[layer], attentions[layer], atol=TOL, rtol=0)
    if config.pool == "map":
        with torch.no_grad():
            tokens, _ = model.forward_features(x)
            reference.attn_pool.fused_attn = False
            torch.testing.assert_close(model.embed(x), reference.forward_head(tokens))
    # Our file loads into timm with zero renaming.
    from vitcli.weights.format import save_model
    from vitcli.weights.readers import read_safetensors

    tensors, _ = read_safetensors(save_model(bundle, tmp_path / "ours.safetensors"))
    reference.load_state_dict(tensors, strict=True)


# -- layouts without timm: state dicts in timm's names, config read back ----------------------
LAYOUTS = {
    "deit_tiny_distilled_patch16_224": dict(dist_token=True, pool="dist"),
    "deit3_small_patch16_224": dict(no_embed_class=True, layer_scale=1e-6),
    "vit_small_patch14_reg4_dinov2": dict(reg_tokens=4, no_embed_class=True, layer_scale=1e-5),
    "vit_giant_patch14_dinov2": dict(act="swiglu", layer_scale=1e-5),
    "vit_base_patch16_clip_quickgelu_224": dict(
        pre_norm=True, patch_bias=False, act="quick_gelu", ln_eps=1e-5, head_kind="projection"
    ),
    "vit_base_patch16_siglip_224": dict(class_token=False, pool="map"),
    "vit_base_patch16_siglip_gap_224": dict(class_token=False, pool="mean"),
}


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_config_is_read_off_a_timm_layout(tmp_path, arch):
    fields = LAYOUTS[arch]
    num_classes = 0 if "dinov2" in arch or "siglip" in arch else 5
    config = tiny_config(num_classes=num_classes, **fields)
    source = randomised(config)
    pool = {"map": "map", "mean": "avg"}.get(config.pool, "token")
    folder = write_timm_folder(
        tmp_path, arch, source.state_dict(), num_classes=num_classes, tag="x", global_pool=pool
    )
    bundle = load_model(str(folder))
    assert bundle.config.replace(family="vit", name="") == config
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), source(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "arch,family",
    [
        ("beit_base_patch16_224", "BEiT"),
        ("eva02_base_patch14_224", "EVA"),
        ("vit_base_patch16_rope_reg1_gap_256", "RoPE"),
        ("swin_base_patch4_window7_224", "Swin"),
    ],
)
def test_unsupported_timm_families_are_refused_by_name(tmp_path, arch, family):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": arch}))
    with pytest.raises(CheckpointError, match=f"{family}.*not supported; supported"):
        load_model(str(tmp_path))
