"""The network itself: shapes, variants, the two attention paths, position embeddings."""

import pytest
import torch
from checkpoints import randomised, tiny_config

from vitcli.model import ViT, ViTConfig
from vitcli.model.posembed import resample_grid, sincos_2d


def tiny(**overrides) -> ViTConfig:
    return tiny_config(**{"depth": 3, **overrides})


@pytest.mark.parametrize(
    "variant,params_m",
    [("Ti/16", 5.7), ("S/16", 22.1), ("B/16", 86.6)],
)
def test_variant_parameter_counts_match_the_paper(variant, params_m):
    config = ViTConfig.from_variant(variant)
    with torch.device("meta"):
        model = ViT(config)
    assert model.num_parameters() / 1e6 == pytest.approx(params_m, abs=0.05)


def test_variant_table_and_errors():
    config = ViTConfig.from_variant("l/32", num_classes=10)
    assert (config.depth, config.width, config.num_heads, config.mlp_dim, config.patch_size) == (
        24,
        1024,
        16,
        4096,
        32,
    )
    assert config.name == "L/32" and config.num_classes == 10
    with pytest.raises(ValueError, match="unknown variant"):
        ViTConfig.from_variant("X/16")
    with pytest.raises(ValueError, match="patch size"):
        ViTConfig.from_variant("B/15")
    with pytest.raises(ValueError, match="not divisible"):
        tiny(num_heads=5)
    with pytest.raises(ValueError, match="multiple of patch size"):
        tiny(image_size=(30, 32))


def test_config_round_trips_through_json():
    config = tiny(image_size=(32, 48), pos_embed="sincos2d", pool="mean", class_token=False)
    assert ViTConfig.from_json(config.to_json()) == config
    assert config.grid_size == (4, 6) and config.num_patches == 24


def test_explicit_and_fused_attention_agree():
    model = randomised(tiny(image_size=(32, 48)))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        fast = model(x)
        explicit, weights = model.forward_with_attention(x, layers=[0, 1, 2])
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    assert sorted(weights) == [0, 1, 2]
    for layer_weights in weights.values():
        assert layer_weights.shape == (2, 4, 1 + 24, 1 + 24)
        torch.testing.assert_close(layer_weights.sum(-1), torch.ones(2, 4, 25))


def test_only_chosen_layers_take_the_explicit_path():
    model = randomised(tiny())
    with torch.no_grad():
        _, weights = model.forward_with_attention(torch.randn(1, 3, 32, 32), layers=[-1])
    assert list(weights) == [2]
    with pytest.raises(IndexError):
        model.forward_with_attention(torch.randn(1, 3, 32, 32), layers=[3])


def test_patch_tokens_are_row_major_on_non_square_grids():
    model = randomised(tiny(image_size=(16, 32)))  # grid 2 x 4
    x = torch.zeros(1, 3, 16, 32)
    x[:, :, 8:16, 0:8] = 1.0  # patch at row 1, column 0 -> token index 1*4 + 0
    with torch.no_grad():
        tokens, _ = model.patch_embed(x)
        base, _ = model.patch_embed(torch.zeros_like(x))
    changed = (tokens - base).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [4]


def test_other_input_sizes_resample_the_position_embedding():
    model = randomised(tiny())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 64)).shape == (2, 5)
        # Resampling to the same grid is the identity; the CLS row is always kept.
        table = resample_grid(model.pos_embed, (4, 4), (6, 8), num_prefix_tokens=1)
    assert table.shape == (1, 1 + 48, 32)
    torch.testing.assert_close(table[:, 0], model.pos_embed[:, 0])
    assert resample_grid(model.pos_embed, (4, 4), (4, 4), 1) is model.pos_embed


def test_resampling_a_smooth_table_keeps_its_layout():
    # A table that is a linear ramp along rows only must stay a ramp along rows, not columns.
    rows = torch.arange(4.0).repeat_interleave(6).reshape(1, 24, 1).expand(1, 24, 8)
    table = torch.cat([torch.zeros(1, 1, 8), rows], dim=1)
    out = resample_grid(table, (4, 6), (8, 12), num_prefix_tokens=1)[0, 1:, 0].reshape(8, 12)
    assert torch.allclose(out[:, 0], out[:, -1], atol=1e-5)
    assert out[-1, 0] > out[0, 0]


def test_set_image_size_changes_the_trained_grid():
    model = randomised(tiny())
    model.set_image_size((48, 64))
    assert model.config.grid_size == (6, 8)
    assert model.pos_embed.shape == (1, 49, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 64)).shape == (1, 5)


def test_sincos_table_is_fixed_and_distinct():
    table = sincos_2d((4, 6), 32)
    assert table.shape == (24, 32)
    assert torch.cdist(table, table).add(torch.eye(24)).min() > 0.1  # every position distinct
    model = ViT(tiny(pos_embed="sincos2d"))
    assert "pos_embed" in model.state_dict()
    assert not any(name == "pos_embed" for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 30)


def test_mean_pooling_without_class_token():
    model = randomised(tiny(class_token=False, pool="mean"))
    with torch.no_grad():
        tokens, weights = model.forward_features(torch.randn(2, 3, 32, 32), attn_layers=[0])
    assert tokens.shape == (2, 16, 32) and weights[0].shape == (2, 4, 16, 16)


def test_training_mode_backward_and_drop_path():
    model = ViT(tiny(dropout=0.1, attn_dropout=0.1, drop_path=0.1)).train()
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None


# -- the families after the paper: flags of the same ViT ---------------------------------
FAMILIES = {
    "deit-distilled": dict(dist_token=True, pool="dist"),
    "deit3": dict(no_embed_class=True, layer_scale=1e-6),
    "dinov2-reg": dict(reg_tokens=4, no_embed_class=True, layer_scale=1e-5, patch_size=8),
    "dinov2-giant-swiglu": dict(act="swiglu", layer_scale=1e-5, pool="cls+mean"),
    "clip": dict(pre_norm=True, patch_bias=False, act="quick_gelu", head_kind="projection"),
    "siglip-map": dict(class_token=False, pool="map", act="gelu_tanh"),
    "siglip-gap": dict(class_token=False, pool="mean", act="gelu_tanh"),
    "timm-avg-fc-norm": dict(pool="mean", fc_norm=True),
    "registers-with-positions": dict(reg_tokens=2),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_runs_and_its_explicit_attention_matches_the_fused_path(name):
    config = tiny(image_size=(32, 48), **FAMILIES[name])
    model = randomised(config, std=0.1)
    for layer in model.modules():  # layer scale far from its tiny init, so it matters
        if hasattr(layer, "gamma"):
            layer.gamma.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 48)
    tokens_count = config.num_prefix_tokens + 24
    with torch.no_grad():
        fast = model(x)
        explicit, weights = model.forward_with_attention(x, layers=[0, 1, 2])
        other = model(torch.randn(1, 3, 48, 32))  # non-native grid: resampled table
    assert fast.shape == (2, 5) and other.shape == (1, 5) and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    for layer_weights in weights.values():
        assert layer_weights.shape == (2, 4, tokens_count, tokens_count)
    assert ViTConfig.from_json(config.to_json()) == config


def test_prefix_token_order_and_position_rows():
    config = tiny(reg_tokens=3, no_embed_class=True)
    model = ViT(config)
    assert config.num_prefix_tokens == 4 and config.pos_prefix_tokens == 0
    assert model.pos_embed.shape == (1, 16, 32) and model.reg_token.shape == (1, 3, 32)
    with torch.no_grad():
        model.cls_token.fill_(7.0)
        model.reg_token.fill_(-7.0)
        model.pos_embed.fill_(100.0)
        for block in model.blocks:  # blocks as identity: zero both residual branches
            block.attn.proj.weight.zero_(), block.attn.proj.bias.zero_()
            block.mlp.fc2.weight.zero_(), block.mlp.fc2.bias.zero_()
        model.norm = torch.nn.Identity()
        tokens, _ = model.forward_features(torch.zeros(1, 3, 32, 32))
    assert (tokens[0, 0] == 7).all() and (tokens[0, 1:4] == -7).all()  # no position added
    assert (tokens[0, 4:] == 100).all()
    distilled = tiny(dist_token=True, pool="dist")
    assert distilled.num_prefix_tokens == 2 and ViT(distilled).pos_embed.shape == (1, 18, 32)


def test_distilled_logits_average_both_heads_and_cls_mean_doubles_the_head():
    model = randomised(tiny(dist_token=True, pool="dist"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        both = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(x), both)
    assert ViT(tiny(pool="cls+mean")).head.in_features == 64
    model.reset_head(3)
    assert model.head.out_features == 3 and model.head_dist.out_features == 3


def test_quick_gelu_and_swiglu_follow_their_formulas():
    from vitcli.model.vit import MLP

    x = torch.randn(4, 8)
    mlp = MLP(8, 6, act="quick_gelu", dropout=0.0)
    hidden = mlp.fc1(x)
    torch.testing.assert_close(mlp(x), mlp.fc2(hidden * torch.sigmoid(1.702 * hidden)))
    glu = MLP(8, 6, act="swiglu", dropout=0.0)
    assert glu.fc1.out_features == 12 and glu.fc2.in_features == 6
    gate, value = glu.fc1(x).split(6, dim=-1)
    torch.testing.assert_close(glu(x), glu.fc2(torch.nn.functional.silu(gate) * value))


def test_map_pool_attention_and_projection_embedding():
    model = randomised(tiny(class_token=False, pool="map"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        weights = model.map_attention(tokens)
        assert weights.shape == (2, 4, 1, 16)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 1))
        assert model.embed(x).shape == (2, 32)
        clip = randomised(tiny(head_kind="projection", num_classes=12))
        assert clip.embed(x).shape == (2, 12)
    with pytest.raises(ValueError, match="pool 'map'"):
        randomised(tiny()).map_attention(tokens)


def test_old_metadata_without_family_fields_loads_as_the_plain_vit():
    old = {
        k: v
        for k, v in tiny().to_dict().items()
        if k
        in (
            "image_size",
            "patch_size",
            "in_channels",
            "num_classes",
            "width",
            "depth",
            "num_heads",
            "mlp_dim",
            "pos_embed",
            "class_token",
            "pool",
            "qkv_bias",
            "ln_eps",
            "act",
            "dropout",
            "attn_dropout",
            "drop_path",
            "name",
        )
    }
    config = ViTConfig.from_dict(old)
    assert config == tiny() and config.num_prefix_tokens == 1 and config.family == "vit"
    assert sorted(ViT(config).state_dict()) == sorted(ViT(tiny()).state_dict())


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(pool="dist"), "needs dist_token"),
        (dict(class_token=False, pool="cls+mean"), "needs class_token"),
        (dict(dist_token=True, reg_tokens=2), "no reg_tokens"),
        (dict(layer_scale=0.0), "layer_scale"),
        (dict(act="relu"), "act must be"),
        (dict(pos_resample="nearest"), "pos_resample"),
    ],
)
def test_invalid_family_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny(**fields)


def test_sanity_problems_flag_absurd_configs():
    assert tiny().sanity_problems() == []
    assert ViTConfig.from_variant("H/14").sanity_problems() == []
    assert tiny(mlp_dim=4096).sanity_problems()
    assert tiny(depth=1000).sanity_problems()


@pytest.mark.parametrize("mode", ["bicubic-antialias", "bicubic", "bicubic-offset"])
def test_resampling_rules_give_the_asked_grid(mode):
    table = torch.randn(1, 1 + 16, 8)
    out = resample_grid(table, (4, 4), (3, 7), num_prefix_tokens=1, mode=mode)
    assert out.shape == (1, 1 + 21, 8)
    torch.testing.assert_close(out[:, 0], table[:, 0])
    plain = resample_grid(table, (4, 4), (3, 7), num_prefix_tokens=1, mode="bicubic")
    assert (mode == "bicubic") == torch.equal(out, plain)


def test_describe_family_for_vit_info():
    from vitcli.model import describe_family

    plain = describe_family(tiny())
    assert plain["family"] == "vit" and plain["prefix"] == "CLS" and plain["layer_scale"] is None
    regs = describe_family(
        tiny(reg_tokens=4, no_embed_class=True, layer_scale=1e-5, num_classes=0, family="dinov2")
    )
    assert (regs["prefix_tokens"], regs["prefix"]) == (5, "CLS + 4 registers")
    assert regs["head"] == "none (features only)" and regs["layer_scale"] == 1e-5
    assert "no position for prefix tokens" in regs["extras"]
    clip = describe_family(tiny(head_kind="projection", num_classes=12, act="quick_gelu"))
    assert clip["embedding_dim"] == 12 and clip["mlp"] == "QuickGELU"
    assert describe_family(tiny(pool="cls+mean"))["embedding_dim"] == 64
