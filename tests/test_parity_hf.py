"""Parity with Hugging Face transformers: tiny random ViTs saved as real HF folders load through
load_model and give the same logits, the same per-head attention weights in every layer, and the
same preprocessing as ViTImageProcessor."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from vitcli.data.loader import prepare

transformers = pytest.importorskip("transformers")

from vitcli.errors import CheckpointError
from vitcli.weights.resolve import load_model

TOL = 1e-4

CONFIGS: dict[str, dict[str, Any]] = {
    "square-p8-gelu": dict(
        image_size=32, patch_size=8, hidden_act="gelu", qkv_bias=True, layer_norm_eps=1e-12
    ),
    "nonsquare-32x48-p8-gelu_new-noqkvbias": dict(
        image_size=(32, 48),
        patch_size=8,
        hidden_act="gelu_new",
        qkv_bias=False,
        layer_norm_eps=1e-6,
    ),
    "nonsquare-48x32-p16-tanh": dict(
        image_size=(48, 32),
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        qkv_bias=True,
        layer_norm_eps=1e-12,
    ),
}


def hf_model(seed: int = 0, num_labels: int = 4, bare: bool = False, **fields):
    """A random transformers ViT with weights N(0, 0.2): attention far from uniform."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    settings: dict[str, Any] = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    settings.update(fields)
    config = ViTConfig(**settings)
    torch.manual_seed(seed)
    model = (
        ViTModel(config, add_pooling_layer=True) if bare else ViTForImageClassification(config)
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def pixels(config, batch: int = 2, seed: int = 1) -> torch.Tensor:
    height, width = (
        config.image_size
        if isinstance(config.image_size, (list, tuple))
        else (config.image_size,) * 2
    )
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


def assert_same_outputs(reference, bundle, x: torch.Tensor) -> None:
    depth = reference.config.num_hidden_layers
    with torch.no_grad():
        expected = reference(pixel_values=x, output_attentions=True)
        logits, weights = bundle.model.forward_with_attention(x, layers=range(depth))
    torch.testing.assert_close(logits, expected.logits, atol=TOL, rtol=0)
    assert len(expected.attentions) == depth and sorted(weights) == list(range(depth))
    for layer in range(depth):
        # (B, nh, T, T) with T = 1 + Hp*Wp, softmax rows over keys, per head.
        assert weights[layer].shape == expected.attentions[layer].shape
        torch.testing.assert_close(weights[layer], expected.attentions[layer], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_every_attention_map_match_transformers(tmp_path, name):
    reference = hf_model(**CONFIGS[name])
    reference.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "vit.encoder.layer.0.attention.attention.query.weight" in _keys(
        tmp_path / "model.safetensors"
    )
    bundle = load_model(str(tmp_path))
    assert bundle.source_format == "hf"
    config = bundle.config
    assert config.image_size == tuple(np.broadcast_to(saved["image_size"], 2))
    assert config.patch_size == saved["patch_size"] and config.ln_eps == saved["layer_norm_eps"]
    assert config.qkv_bias == saved["qkv_bias"]
    assert config.act == ("gelu" if saved["hidden_act"] == "gelu" else "gelu_tanh")
    assert bundle.labels == [saved["id2label"][str(i)] for i in range(4)]
    assert_same_outputs(reference, bundle, pixels(reference.config))


def test_transformers5_in_memory_key_names(tmp_path):
    from safetensors.torch import save_file

    reference = hf_model(image_size=(32, 48), seed=3)
    reference.save_pretrained(tmp_path)
    live = reference.state_dict()  # transformers 5 names: vit.layers.0.attention.q_proj.weight, ...
    assert "vit.layers.0.attention.q_proj.weight" in live and "vit.layers.0.mlp.fc1.weight" in live
    save_file({k: v.contiguous() for k, v in live.items()}, str(tmp_path / "model.safetensors"))
    assert_same_outputs(reference, load_model(str(tmp_path)), pixels(reference.config))


def test_pytorch_model_bin_read_with_weights_only(tmp_path):
    from safetensors.torch import load_file

    reference = hf_model(seed=4)
    reference.save_pretrained(tmp_path)
    legacy = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    bundle = load_model(str(tmp_path))
    assert bundle.extra["weights_file"] == "pytorch_model.bin"
    assert_same_outputs(reference, bundle, pixels(reference.config))


def test_pytorch_model_bin_with_code_is_refused(tmp_path):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(1), "payload": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="other than tensors") as error:
        load_model(str(tmp_path))
    # torch's own message advises weights_only=False; ours never passes that on.
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


class _Payload:
    """Any class instance: weights_only=True must refuse to unpickle it."""


def test_bare_vitmodel_without_prefix_drops_the_pooler(tmp_path):
    reference = hf_model(bare=True, seed=5)
    reference.save_pretrained(tmp_path)
    keys = _keys(tmp_path / "model.safetensors")
    assert "embeddings.cls_token" in keys and "pooler.dense.weight" in keys
    bundle = load_model(str(tmp_path))
    assert bundle.config.num_classes == 0 and bundle.labels == []
    assert bundle.extra["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"]
    x = pixels(reference.config)
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state
        tokens, _ = bundle.model.forward_features(x)
    torch.testing.assert_close(tokens, expected, atol=TOL, rtol=0)


def test_labels_come_from_id2label(tmp_path):
    reference = hf_model(num_labels=3, id2label={0: "tabby", 1: "espresso", 2: "rocket"})
    reference.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).labels == ["tabby", "espresso", "rocket"]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # ViTImageProcessor defaults: squash 224x224, bilinear, 0.5/0.5
        dict(
            size={"height": 32, "width": 48},
            resample=3,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
    ],
    ids=["defaults", "32x48-bicubic-imagenet"],
)
@pytest.mark.parametrize("photo", ["chelsea.png", "rocket.jpg"])
def test_preprocessing_matches_vitimageprocessor_pil_backend(
    tmp_path, examples_dir, settings, photo, hf_backend
):
    from PIL import Image
    from transformers import ViTImageProcessor

    from vitcli.data.images import open_image

    processor = ViTImageProcessor(**settings)
    # Without torchvision, transformers 5 falls back to its PIL backend: what we compare with.
    assert type(processor).__name__ == "ViTImageProcessorPil"
    reference = hf_model(
        image_size=(32, 48) if settings else 224,
        patch_size=8 if settings else 16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    reference.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    preprocess = load_model(str(tmp_path)).preprocess
    with Image.open(examples_dir / photo) as image:
        expected = processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
    image, _ = open_image(examples_dir / photo)  # our decoder, full resolution (no draft mode)
    ours = prepare(image, preprocess).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def _keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())
