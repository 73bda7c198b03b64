"""Loaders for each checkpoint format, built locally (no network): timm folders, Google .npz
files in both Google layouts, our own format, and hub ids read from an HF cache folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import TINY_LABELS, populate_hub_cache, random_vit, to_google, write_npz
from safetensors.torch import save_file

from vitcli.errors import CheckpointError, OfflineError
from vitcli.weights.format import save_model
from vitcli.weights.resolve import load_model


def inputs(model, batch: int = 2, seed: int = 1) -> torch.Tensor:
    height, width = model.config.image_size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def logits_of(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# -- timm folders ------------------------------------------------------------------------------
def write_timm_folder(folder: Path, model, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_timm_folder_with_model_args_and_imagenet_labels(tmp_path):
    model = random_vit(num_classes=1000)
    folder = write_timm_folder(
        tmp_path / "timm",
        model,
        architecture="vit_tiny_patch16_224",
        num_classes=1000,
        global_pool="token",
        # timm's own override mechanism; keeps the test model tiny
        model_args=dict(
            embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=8, img_size=32
        ),
        pretrained_cfg=dict(
            tag="augreg_in21k_ft_in1k",
            input_size=[3, 32, 32],
            crop_pct=0.9,
            interpolation="bicubic",
            mean=[0.5, 0.5, 0.5],
            std=[0.5, 0.5, 0.5],
        ),
    )
    bundle = load_model(str(folder))
    assert bundle.source_format == "timm" and bundle.extra["tag"] == "augreg_in21k_ft_in1k"
    assert bundle.config.to_dict() == {**model.config.to_dict(), "name": ""}
    assert bundle.labels[0] == "tench, Tinca tinca" and bundle.labels[-1].startswith(
        "toilet tissue"
    )
    assert len(bundle.labels) == 1000 and bundle.extra["labels_from"] == "imagenet-1k"
    pre = bundle.preprocess
    assert (pre.size, pre.resize, pre.crop_pct, pre.interpolation) == (
        (32, 32),
        "shorter",
        0.9,
        "bicubic",
    )
    x = inputs(model)
    torch.testing.assert_close(logits_of(bundle.model, x), logits_of(model, x), atol=0, rtol=0)


def test_timm_folder_label_names_and_named_architecture(tmp_path):
    from vitcli.weights.timm import parse_architecture

    assert parse_architecture("vit_base_patch16_384.augreg_in21k_ft_in1k") == (
        "base",
        16,
        (384, 384),
    )
    assert parse_architecture("deit_small_patch16_224") == ("small", 16, (224, 224))
    assert parse_architecture("vit_huge_patch14_224") == ("huge", 14, (224, 224))
    for unsupported in ("vit_large_patch14_clip_224", "vit_base_patch16_reg4_gap_256", "resnet50"):
        with pytest.raises(CheckpointError, match="not"):
            parse_architecture(unsupported)
    model = random_vit(num_classes=5)
    folder = write_timm_folder(
        tmp_path / "timm",
        model,
        architecture="vit_small_patch16_224",
        num_classes=5,
        label_names=TINY_LABELS,
        model_args=dict(
            embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=8, img_size=32
        ),
    )
    bundle = load_model(str(folder / "model.safetensors"))  # the weights file finds its folder
    assert bundle.labels == TINY_LABELS
    # No pretrained_cfg: timm's defaults (ImageNet mean/std, crop 0.875, bicubic).
    assert bundle.preprocess.crop_pct == 0.875 and bundle.preprocess.mean == (0.485, 0.456, 0.406)


def test_timm_folder_whose_weights_do_not_fit_the_architecture(tmp_path):
    model = random_vit()
    folder = write_timm_folder(
        tmp_path / "timm", model, architecture="vit_tiny_patch16_224", num_classes=5
    )
    # vit_tiny is width 192 and depth 12: the 32-wide, 2-deep weights must be refused by name.
    with pytest.raises(CheckpointError, match=r"missing \d+ keys \(blocks\.10\.") as error:
        load_model(str(folder))
    assert "model.safetensors" in str(error.value)


# -- Google .npz -------------------------------------------------------------------------------
def jax_logits(
    arrays: dict[str, np.ndarray], x: np.ndarray, prefix: str = "", gelu: str = "tanh"
) -> np.ndarray:
    """The vit_jax forward pass written directly on the Google arrays (NHWC, einsums, flax GELU)."""
    w = {k[len(prefix) :]: v.astype(np.float64) for k, v in arrays.items() if k.startswith(prefix)}

    def layer_norm(z, name):
        mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
        return (z - mean) / np.sqrt(var + 1e-6) * w[name + "/scale"] + w[name + "/bias"]

    def gelu_fn(z):
        if gelu == "tanh":  # flax nn.gelu(approximate=True)
            return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
        return 0.5 * z * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))

    kernel = w["embedding/kernel"]
    patch = kernel.shape[0]
    batch, height, width_px, channels = x.shape
    grid_h, grid_w = height // patch, width_px // patch
    patches = x.reshape(batch, grid_h, patch, grid_w, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    z = (
        np.einsum("bhwpqc,pqcd->bhwd", patches, kernel).reshape(batch, grid_h * grid_w, -1)
        + w["embedding/bias"]
    )
    if "cls" in w:
        z = np.concatenate([np.broadcast_to(w["cls"], (batch, 1, z.shape[-1])), z], axis=1)
    z = z + w.get("Transformer/posembed_input/pos_embedding", w.get("pos_embedding"))
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    depth = (
        w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        if scanned
        else sum(1 for k in w if k.endswith("LayerNorm_0/scale") and "encoderblock_" in k)
    )
    for i in range(depth):
        base = "Transformer/encoderblock/" if scanned else f"Transformer/encoderblock_{i}/"
        p = {k[len(base) :]: (v[i] if scanned else v) for k, v in w.items() if k.startswith(base)}
        mha = next(k.split("/")[0] for k in p if k.startswith("MultiHeadDotProductAttention"))
        norm2 = "LayerNorm_2" if "LayerNorm_2/scale" in p else "LayerNorm_1"
        mlp = "MlpBlock_3" if "MlpBlock_3/Dense_0/kernel" in p else "MlpBlock_0"
        mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
        y = (z - mean) / np.sqrt(var + 1e-6) * p["LayerNorm_0/scale"] + p["LayerNorm_0/bias"]
        q, k, v = (
            np.einsum("btd,dhk->bthk", y, p[f"{mha}/{n}/kernel"]) + p[f"{mha}/{n}/bias"]
            for n in ("query", "key", "value")
        )
        scores = np.einsum("bqhk,bshk->bhqs", q / np.sqrt(q.shape[-1]), k)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        attended = np.einsum("bhqs,bshk->bqhk", scores, v)
        z = z + np.einsum("bqhk,hkd->bqd", attended, p[f"{mha}/out/kernel"]) + p[f"{mha}/out/bias"]
        mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
        y = (z - mean) / np.sqrt(var + 1e-6) * p[f"{norm2}/scale"] + p[f"{norm2}/bias"]
        hidden = gelu_fn(y @ p[f"{mlp}/Dense_0/kernel"] + p[f"{mlp}/Dense_0/bias"])
        z = z + hidden @ p[f"{mlp}/Dense_1/kernel"] + p[f"{mlp}/Dense_1/bias"]
    z = layer_norm(z, "Transformer/encoder_norm")
    pooled = z[:, 0] if "cls" in w else z.mean(axis=1)
    if "pre_logits/kernel" in w:
        pooled = np.tanh(pooled @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    return pooled @ w["head/kernel"] + w["head/bias"]


@pytest.mark.parametrize("prefix,num_classes", [("", 7), ("opt/target/", 1000)])
def test_npz_vit_jax_layout_matches_the_jax_formula(tmp_path, prefix, num_classes):
    model = random_vit(num_classes=num_classes)
    arrays = to_google(model, prefix=prefix)
    if prefix:
        arrays["opt/state/step"] = np.array(1000)  # optimizer state outside the prefix is ignored
    bundle = load_model(str(write_npz(tmp_path / "ViT-tiny.npz", arrays)))
    assert bundle.source_format == "npz" and bundle.extra["prefix"] == prefix
    config = bundle.config
    assert (config.width, config.depth, config.num_heads, config.mlp_dim, config.patch_size) == (
        32,
        2,
        4,
        64,
        8,
    )
    assert config.image_size == (32, 32) and config.num_classes == num_classes
    assert config.act == "gelu_tanh" and config.ln_eps == 1e-6
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(
            bundle.model.state_dict()[name], tensor, atol=0, rtol=0, msg=name
        )
    if num_classes == 1000:
        assert bundle.labels[1] == "goldfish, Carassius auratus"
    pre = bundle.preprocess
    assert (pre.resize, pre.interpolation, pre.mean, pre.std) == (
        "squash",
        "bilinear",
        (0.5,) * 3,
        (0.5,) * 3,
    )
    x = inputs(model)
    expected = jax_logits(arrays, x.permute(0, 2, 3, 1).numpy().astype(np.float64), prefix=prefix)
    np.testing.assert_allclose(logits_of(bundle.model, x).numpy(), expected, atol=1e-6, rtol=0)


def test_npz_gelu_is_the_tanh_form_of_the_jax_code(tmp_path):
    """The two GELUs give visibly different logits; the loaded model follows the JAX (tanh) one."""
    model = random_vit(num_classes=7)
    arrays = to_google(model)
    x = inputs(model)
    ours = logits_of(load_model(str(write_npz(tmp_path / "m.npz", arrays))).model, x).numpy()
    nhwc = x.permute(0, 2, 3, 1).numpy().astype(np.float64)
    tanh_error = np.abs(ours - jax_logits(arrays, nhwc, gelu="tanh")).max()
    erf_error = np.abs(ours - jax_logits(arrays, nhwc, gelu="erf")).max()
    assert tanh_error < 1e-6 and erf_error > 1e-5


def test_npz_big_vision_scanned_average_pool(tmp_path):
    model = random_vit(num_classes=3, class_token=False, pool="mean", image_size=(32, 32))
    arrays = to_google(model, prefix="params/img/", big_vision=True, scanned=True)
    bundle = load_model(str(write_npz(tmp_path / "bv.npz", arrays)))
    assert bundle.extra["layout"] == "big_vision" and bundle.extra["scanned"]
    assert not bundle.config.class_token and bundle.config.pool == "mean"
    x = inputs(model)
    expected = jax_logits(
        arrays, x.permute(0, 2, 3, 1).numpy().astype(np.float64), prefix="params/img/"
    )
    np.testing.assert_allclose(logits_of(bundle.model, x).numpy(), expected, atol=1e-6, rtol=0)


def test_npz_21k_file_with_pre_logits_and_zero_head(tmp_path):
    model = random_vit(num_classes=21843)
    arrays = to_google(model, prefix="", pre_logits="zero-head")
    bundle = load_model(str(write_npz(tmp_path / "imagenet21k_ViT-tiny.npz", arrays)))
    assert bundle.config.num_classes == 21843 and len(bundle.labels) == 21843
    assert any("pre_logits" in item for item in bundle.extra["dropped"])
    assert "all zeros" in bundle.extra["note"]
    x = inputs(model, batch=1)
    # The released heads are zero, so the JAX logits are exactly 0 whatever pre_logits does.
    expected = jax_logits(arrays, x.permute(0, 2, 3, 1).numpy().astype(np.float64))
    assert not expected.any()
    assert not logits_of(bundle.model, x).any()


def test_npz_pre_logits_with_a_trained_head_drops_the_head(tmp_path):
    model = random_vit(num_classes=7)
    bundle = load_model(
        str(write_npz(tmp_path / "m.npz", to_google(model, pre_logits="trained-head")))
    )
    assert bundle.config.num_classes == 0 and bundle.labels == []
    assert any("head, which reads pre_logits" in item for item in bundle.extra["dropped"])


def test_npz_bad_files(tmp_path):
    model = random_vit()
    arrays = to_google(model)
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    with pytest.raises(
        CheckpointError, match="missing array 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias'"
    ):
        load_model(str(write_npz(tmp_path / "incomplete.npz", arrays)))
    arrays = to_google(model)
    arrays["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
    with pytest.raises(
        CheckpointError, match="unexpected arrays Transformer/encoderblock_0/extra/kernel"
    ):
        load_model(str(write_npz(tmp_path / "extra.npz", arrays)))
    np.savez(tmp_path / "objects.npz", embedding=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="holds Python objects") as error:
        load_model(str(tmp_path / "objects.npz"))
    assert "allow_pickle" not in str(error.value)


# -- our format --------------------------------------------------------------------------------
def test_our_format_round_trip_fp32_and_fp16(tmp_path, tiny_model, tiny_model_file):
    from safetensors import safe_open

    bundle = load_model(str(tiny_model_file))
    assert bundle.source_format == "vitcli" and bundle.labels == TINY_LABELS
    assert bundle.config == tiny_model.config
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name
    half = save_model(bundle, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(half), framework="pt") as handle:
        assert handle.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.float16
    assert half.stat().st_size < 0.6 * tiny_model_file.stat().st_size
    reloaded = load_model(str(half))
    assert reloaded.labels == TINY_LABELS and reloaded.preprocess == bundle.preprocess
    for name, tensor in tiny_model.state_dict().items():
        loaded = reloaded.model.state_dict()[name]
        assert loaded.dtype == torch.float32  # stored half, computed in float32
        assert torch.equal(loaded, tensor.half().float()), name


# -- hub ids from the HF cache -----------------------------------------------------------------
@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_read_from_the_cache_offline(tmp_path, offline_cache):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=2,
    )
    torch.manual_seed(0)
    reference = transformers.ViTForImageClassification(config).eval()
    reference.save_pretrained(tmp_path / "saved")
    processor = {
        "do_resize": True,
        "size": {"height": 32, "width": 32},
        "resample": 3,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "image_processor_type": "ViTImageProcessor",
    }
    snapshot = populate_hub_cache(
        offline_cache,
        "tiny-org/tiny-vit",
        {
            "config.json": (tmp_path / "saved" / "config.json").read_bytes(),
            "model.safetensors": (tmp_path / "saved" / "model.safetensors").read_bytes(),
            "preprocessor_config.json": json.dumps(processor).encode(),
        },
    )
    bundle = load_model("tiny-org/tiny-vit")
    assert bundle.source_format == "hf" and bundle.reference == "tiny-org/tiny-vit"
    assert bundle.preprocess.interpolation == "bicubic"
    from vitcli.weights.hub import download

    assert download("tiny-org/tiny-vit") == snapshot
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            bundle.model(x), reference(pixel_values=x).logits, atol=1e-4, rtol=0
        )


def test_hub_id_not_cached_offline_says_how_to_fetch(offline_cache):
    with pytest.raises(OfflineError) as error:
        load_model("tiny-org/not-downloaded")
    message = str(error.value)
    assert "\n" not in message
    assert "vit fetch tiny-org/not-downloaded" in message and "HF_HUB_OFFLINE" in message
