"""`vit attention` on the ViT families: registers, DeiT's dist token, SigLIP's MAP head, layer
scale. Per-head maps are query rows renormalised over the patches with the prefix mass kept
apart; rollout keeps every token and starts from the class query (CLS or the probe)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.errors import InputError
from vitcli.explain import explain
from vitcli.explain.forward import kept_layers
from vitcli.explain.maps import rollout, token_order
from vitcli.explain.methods import chain
from vitcli.model import ViT, ViTConfig
from vitcli.services.attention import METHODS, Method, register
from vitcli.services.attention.batches import compute_batch, request_of
from vitcli.services.attention.options import AttentionOptions
from vitcli.weights.format import save_model

TINY = dict(image_size=32, patch_size=8, num_classes=5, width=32, depth=2, num_heads=4, mlp_dim=64)
LABELS = ["a", "b", "c", "d", "e"]
FAMILIES = {
    "registers": dict(reg_tokens=4, no_embed_class=True),
    "dist": dict(dist_token=True, pool="dist"),
    "map": dict(class_token=False, pool="map"),
    "map+registers": dict(class_token=False, pool="map", reg_tokens=2),
    "layer-scale": dict(layer_scale=0.1),
}


def family(name: str, seed: int = 0) -> ViT:
    """A tiny model of the family, every parameter N(0, 0.3): attention far from uniform."""
    torch.manual_seed(seed)
    model = ViT(ViTConfig(**TINY, **FAMILIES[name])).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def pixels(size=(32, 48), batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def weights_of(model: ViT, x: torch.Tensor):
    with torch.no_grad():
        tokens, weights = model.forward_features(x, attn_layers=range(model.config.depth))
    return tokens, weights


@pytest.mark.parametrize("name", list(FAMILIES))
def test_query_maps_are_renormalised_and_prefix_masses_complete_them(name):
    """Non-square grid (4x6): each head's map sums to 1 over the patches, its prefix masses are
    the raw row's first P entries, and map x patch mass gives the raw row back."""
    model = family(name)
    x = pixels()
    prefix = model.config.num_prefix_tokens
    _, weights = weights_of(model, x)
    maps = compute_batch(model, x, AttentionOptions(layers=(0, 1), methods=()), LABELS)
    heads, mass = maps["heads"], maps["prefix_mass"]
    assert heads.shape == (2, 2, 4, 4, 6) and mass.shape == (2, 2, 4, prefix)
    torch.testing.assert_close(heads.sum(dim=(-1, -2)), torch.ones(2, 2, 4))
    for layer in (0, 1):
        if model.config.class_token:
            rows = weights[layer][:, :, 0]  # B,nh,T: the CLS query
        else:
            rows = weights[layer].mean(dim=2)  # no CLS: the mean over queries
        torch.testing.assert_close(mass[:, layer], rows[..., :prefix])
        patch_mass = 1.0 - mass[:, layer].sum(-1)  # B,nh
        raw = heads[:, layer] * patch_mass[..., None, None]
        torch.testing.assert_close(raw.reshape(2, 4, 24), rows[..., prefix:])


def test_token_order_names_the_real_prefix():
    def order(name):
        return token_order(ViTConfig(**TINY, **FAMILIES[name])).split(";")[0]

    assert order("registers") == "[CLS, reg_0, ..., reg_3, patch_0, ..., patch_{N-1}]"
    assert order("dist") == "[CLS, dist, patch_0, ..., patch_{N-1}]"
    assert order("map") == "[patch_0, ..., patch_{N-1}]"
    assert order("map+registers") == "[reg_0, reg_1, patch_0, ..., patch_{N-1}]"
    assert order("layer-scale") == "[CLS, patch_0, ..., patch_{N-1}]"


def test_deit_distilled_has_both_the_cls_and_the_dist_maps():
    model = family("dist")
    x = pixels()
    _, weights = weights_of(model, x)
    maps = compute_batch(model, x, AttentionOptions(layers=(1,), methods=()), LABELS)
    assert maps["query"] == "cls" and list(maps["queries"]) == ["dist"]
    dist = maps["queries"]["dist"]
    rows = weights[1][:, :, 1]  # B,nh,T: the dist token's query row
    expected = rows[..., 2:] / rows[..., 2:].sum(-1, keepdim=True)
    torch.testing.assert_close(dist["heads"][:, 0].reshape(2, 4, 24), expected)
    torch.testing.assert_close(dist["prefix_mass"][:, 0], rows[..., :2])
    cls_rows = weights[1][:, :, 0]
    assert not torch.allclose(dist["heads"][:, 0].reshape(2, 4, 24), cls_rows[..., 2:])


@pytest.mark.parametrize("name", ["map", "map+registers"])
def test_the_probe_map_is_map_attention_renormalised_over_the_patches(name):
    model = family(name)
    x = pixels()
    prefix = model.config.num_prefix_tokens
    tokens, _ = weights_of(model, x)
    with torch.no_grad():
        probe = model.map_attention(tokens)[:, :, 0]  # B,nh,T
    maps = compute_batch(model, x, AttentionOptions(layers=(1,), methods=()), LABELS)
    assert maps["query"] == "probe" and maps["head_query"] == "mean"
    heads = maps["queries"]["probe"]["heads"]  # B,1,nh,Hp,Wp
    expected = probe[..., prefix:] / probe[..., prefix:].sum(-1, keepdim=True)
    torch.testing.assert_close(heads[:, 0].reshape(2, 4, 24), expected)
    torch.testing.assert_close(maps["queries"]["probe"]["prefix_mass"][:, 0], probe[..., :prefix])


@pytest.mark.parametrize("name", ["map", "map+registers"])
def test_rollout_of_a_map_head_is_seeded_by_the_probe(name):
    """map = (p̄ R)[patches] with p̄ the probe's head-mean row and R = Ã_L ... Ã_1 formed in full."""
    model = family(name)
    x = pixels()
    prefix = model.config.num_prefix_tokens
    tokens, weights = weights_of(model, x)
    with torch.no_grad():
        seed = model.map_attention(tokens)[:, :, 0].mean(dim=1)  # B,T
    matrix = rollout([weights[i] for i in range(model.config.depth)], prefix=prefix)  # B,T,T
    expected = (seed[:, None] @ matrix)[:, 0]  # B,T
    maps = compute_batch(model, x, AttentionOptions(methods=("rollout",), heads=False), LABELS)
    torch.testing.assert_close(maps["methods"]["rollout"].reshape(2, 24), expected[:, prefix:])
    torch.testing.assert_close(maps["rollout_prefix_mass"], expected[:, :prefix])
    # explain()'s rollout is the same map.
    torch.testing.assert_close(explain(model, x, "rollout").maps, maps["methods"]["rollout"])


def test_rollout_with_registers_keeps_every_token_and_starts_from_cls():
    model = family("registers")
    x = pixels()
    _, weights = weights_of(model, x)
    matrix = rollout([weights[0], weights[1]], prefix=5)
    maps = compute_batch(model, x, AttentionOptions(methods=("rollout",), heads=False), LABELS)
    torch.testing.assert_close(maps["methods"]["rollout"].reshape(2, 24), matrix[:, 0, 5:])
    torch.testing.assert_close(maps["rollout_prefix_mass"], matrix[:, 0, :5])


def test_no_whole_attention_matrix_is_kept_for_heads_and_rollout():
    """Per-head maps and rollout keep only query rows and rollout factors: the forward returns
    no (B, nh, T, T) weights unless a registered method declares the layers."""
    seen = []
    register(
        Method(
            "spy",
            lambda forward: (
                seen.append(sorted(forward.weights))
                or torch.zeros(forward.pixels.shape[0], *forward.grid_size)
            ),
        )
    )
    try:
        model = family("registers")
        options = AttentionOptions(layers=("all",), methods=("rollout", "spy"))
        assert kept_layers(request_of(options, 2), 2) == []
        compute_batch(
            model, pixels(), AttentionOptions(layers=(0, 1), methods=options.methods), LABELS
        )
        assert seen == [[]]
    finally:
        METHODS.pop("spy")


def reference_gae_map_head(model: ViT, image: torch.Tensor, target: int) -> torch.Tensor:
    """gae for a MAP head, one image, written out: r = E_h[(∇P ⊙ P)^+] over the probe's
    weights, then r^T (I + Ā_L) ... (I + Ā_1) over the patches."""
    model.requires_grad_(False)
    x = image[None].clone().requires_grad_(True)
    tokens, weights = model.forward_features(x, attn_layers=range(model.config.depth))
    pooled, probe = model.attn_pool(tokens, return_weights=True)
    logits = model.head(pooled)
    grads = torch.autograd.grad(logits[0, target], [*weights.values(), probe])
    bars = [(g * a).clamp(min=0).mean(dim=1) for g, a in zip(grads[:-1], weights.values())]
    row = (grads[-1] * probe).clamp(min=0).mean(dim=1)[:, 0]  # 1,T
    prefix = model.config.num_prefix_tokens
    return chain(row, bars)[0, prefix:].reshape(4, 6).detach()


@pytest.mark.parametrize("name", ["map", "map+registers"])
def test_gae_with_a_map_head_starts_from_the_probe(name):
    model = family(name)
    x = pixels()
    targets = torch.tensor([1, 3])
    result = explain(model, x, "gae", targets=targets)
    for i in range(2):
        expected = reference_gae_map_head(model, x[i], int(targets[i]))
        torch.testing.assert_close(result.maps[i], expected, rtol=1e-4, atol=1e-7)
    assert float(result.maps.abs().max()) > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradcam_works_for_every_family_and_attribution_refuses_what_it_cannot(name):
    model = family(name)
    x = pixels()
    cam = explain(model, x, "gradcam", targets=torch.tensor([0, 1])).maps
    assert cam.shape == (2, 4, 6) and torch.isfinite(cam).all()
    if name == "registers":
        assert explain(model, x, "attribution", targets=torch.tensor([0, 1])).maps.shape == (
            2,
            4,
            6,
        )
        return
    reason = {
        "dist": "a distillation token",
        "map": "a MAP head",
        "map+registers": "a MAP head",
        "layer-scale": "ls1",
    }[name]
    with pytest.raises(InputError, match=f"--method attribution .*{reason}.*use --method gae"):
        explain(model, x, "attribution", targets=torch.tensor([0, 1]))


def test_gae_on_deit_distilled_reads_both_heads():
    """pool 'dist' averages the CLS and dist heads: gae's chain starts from (e_0 + e_1) / 2."""
    model = family("dist")
    maps = explain(model, pixels(), "gae", targets=torch.tensor([2, 4])).maps
    assert maps.shape == (2, 4, 6) and float(maps.max()) > 0


@pytest.mark.slow
def test_cli_writes_prefix_masses_token_order_and_query_maps(tmp_path):
    Image.new("RGB", (40, 56), (90, 20, 200)).save(tmp_path / "a.png")
    runner = CliRunner()
    for name in ("registers", "dist", "map"):
        model_file = save_model(family(name), tmp_path / f"{name}.safetensors", labels=LABELS)
        out = tmp_path / f"out-{name}"
        result = runner.invoke(
            app,
            ["attention", str(tmp_path / "a.png"), "-m", str(model_file), "--out", str(out)]
            + ["-w", "0", "--method", "raw,rollout,gae", "--per-head"],
        )
        assert result.exit_code == 0, result.output
        meta = json.loads((out / "a" / "meta.json").read_text())
        from safetensors.numpy import load_file

        arrays = load_file(str(out / "a" / "maps.safetensors"))
        np.testing.assert_allclose(arrays["heads"].sum(axis=(-1, -2)), 1.0, atol=1e-5)
        if name == "registers":
            assert meta["token_order"].startswith("[CLS, reg_0, ..., reg_3, patch_0")
            assert meta["prefix_tokens"] == ["CLS", "reg_0", "reg_1", "reg_2", "reg_3"]
            head = meta["prefix_mass"]["cls"][0]["heads"][0]
            assert sum(head.values()) == pytest.approx(1.0, abs=1e-5)
            assert set(head) == {"CLS", "reg_0", "reg_1", "reg_2", "reg_3", "patches"}
            assert arrays["prefix_mass"].shape == (1, 4, 5)
            assert (out / "a" / "layer01_head03.png").is_file()
        elif name == "dist":
            assert meta["queries"] == ["cls", "dist"]
            assert arrays["dist_heads"].shape == (1, 4, 4, 4)
            assert "dist_layer01_head00.png" in meta["files"]["per_head"]
            assert "cls_layer01_mean.png" in meta["files"]["per_head"]
        else:
            assert meta["query"] == "probe" and meta["queries"] == ["mean", "probe"]
            assert meta["token_order"].startswith("[patch_0")
            assert arrays["probe_heads"].shape == (1, 4, 4, 4)
            assert "probe_head02.png" in meta["files"]["per_head"]
            assert "gae.top1" in arrays
