"""The network itself: shapes, variants, the two attention paths, position embeddings."""

import pytest
import torch
from conftest import randomised, tiny_config

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
