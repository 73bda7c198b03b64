"""Parity with transformers for the ViT families: tiny random DeiT, DINO (ViTModel), DINOv2 (with
registers, SwiGLU), CLIP and SigLIP models saved as real folders load through load_model and give
the same logits or pooled features and the same per-head attention in every layer, at the native
size and at a non-native, non-square size (rows shrink, columns grow: antialiasing matters)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import randomise_hf

from vitcli.data.loader import prepare

transformers = pytest.importorskip("transformers")

from vitcli.errors import CheckpointError
from vitcli.weights.resolve import load_model

TOL = 1e-4
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
OTHER_SIZE = (24, 48)  # grid 3x6 from the native 4x4


_randomise = randomise_hf


def _build(kind: str):
    """(transformers model, output reader, whether it interpolates on request) for a case."""
    T = transformers
    eager = dict(attn_implementation="eager")
    if kind.startswith("deit"):
        config = T.DeiTConfig(**SMALL, intermediate_size=64, num_labels=3, **eager)
        cls = {
            "deit-teacher": T.DeiTForImageClassificationWithTeacher,
            "deit-classifier": T.DeiTForImageClassification,
            "deit-model": T.DeiTModel,
        }[kind]
        model = cls(config, add_pooling_layer=True) if kind == "deit-model" else cls(config)
    elif kind == "dino-vitmodel":
        config = T.ViTConfig(**SMALL, intermediate_size=64, layer_norm_eps=1e-6, **eager)
        model = T.ViTModel(config, add_pooling_layer=False)
    elif kind.startswith("dinov2"):
        registers = "reg" in kind
        fields = dict(SMALL, mlp_ratio=2, layer_norm_eps=1e-6, **eager)
        if "swiglu" in kind:
            fields.update(use_swiglu_ffn=True)
        if registers:
            config = T.Dinov2WithRegistersConfig(**fields, num_register_tokens=3, num_labels=3)
            cls = (
                T.Dinov2WithRegistersForImageClassification
                if "classifier" in kind
                else T.Dinov2WithRegistersModel
            )
        else:
            config = T.Dinov2Config(**fields, num_labels=3)
            cls = T.Dinov2ForImageClassification if "classifier" in kind else T.Dinov2Model
        model = cls(config)
    elif kind == "clip-vision":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, intermediate_size=64, **eager))
    elif kind == "clip-projection":
        config = T.CLIPVisionConfig(**SMALL, intermediate_size=64, projection_dim=16, **eager)
        model = T.CLIPVisionModelWithProjection(config)
    elif kind == "clip-full":
        config = T.CLIPConfig(
            vision_config=dict(SMALL, intermediate_size=64),
            text_config=TEXT,
            projection_dim=16,
            **eager,
        )
        model = T.CLIPModel(config)
    elif kind == "siglip-vision":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL, intermediate_size=64, **eager))
    elif kind == "siglip-full":
        config = T.SiglipConfig(
            vision_config=dict(SMALL, intermediate_size=64), text_config=TEXT, **eager
        )
        model = T.SiglipModel(config)
    else:
        raise AssertionError(kind)
    return _randomise(model)


def _reference(model, kind: str, x: torch.Tensor, native: bool):
    """(features or logits, per-layer attentions, tokens after the final LN or None)."""
    kwargs: dict = dict(output_attentions=True)
    if not native and not kind.startswith("dinov2"):  # DINOv2 always interpolates
        kwargs["interpolate_pos_encoding"] = True
    if kind.endswith("full"):
        vision = model.vision_model(pixel_values=x, **kwargs)
        features = model.get_image_features(
            pixel_values=x, interpolate_pos_encoding=kwargs.get("interpolate_pos_encoding", False)
        )
        if not isinstance(features, torch.Tensor):  # transformers 5 returns a model output
            features = features.pooler_output
        return features, vision.attentions, None
    out = model(pixel_values=x, **kwargs)
    if hasattr(out, "logits"):
        return out.logits, out.attentions, None
    if kind == "clip-projection":
        return out.image_embeds, out.attentions, None
    if kind in ("deit-model", "dino-vitmodel"):
        return out.last_hidden_state[:, 0], out.attentions, out.last_hidden_state
    tokens = None if kind == "clip-vision" else out.last_hidden_state  # CLIP: LN on CLS only
    return out.pooler_output, out.attentions, tokens


KINDS = [
    "deit-teacher",
    "deit-classifier",
    "deit-model",
    "dino-vitmodel",
    "dinov2-model",
    "dinov2-classifier",
    "dinov2-swiglu",
    "dinov2-reg-model",
    "dinov2-reg-classifier",
    "clip-vision",
    "clip-projection",
    "clip-full",
    "siglip-vision",
    "siglip-full",
]
FAMILY = {"deit": "deit", "dino": "vit", "dinov2": "dinov2", "clip": "clip", "siglip": "siglip"}


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_every_attention_map_match_transformers(tmp_path, kind):
    reference = _build(kind)
    reference.save_pretrained(tmp_path)
    bundle = load_model(str(tmp_path))
    model, config = bundle.model, bundle.config
    family = FAMILY[kind.split("-")[0]]
    assert config.family == (family + "-reg" if "reg" in kind else family)
    depth = config.depth
    for size in [(32, 32), OTHER_SIZE]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, attentions, tokens = _reference(reference, kind, x, native=size == (32, 32))
            logits, weights = model.forward_with_attention(x, layers=range(depth))
            # Classifiers are compared on logits, the others on the family's embedding.
            ours = logits if config.num_classes and config.head_kind == "classifier" else None
            ours = model.embed(x) if ours is None else ours
            our_tokens, _ = model.forward_features(x)
        torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
        if tokens is not None:
            torch.testing.assert_close(our_tokens, tokens, atol=TOL, rtol=0)
        assert len(attentions) == depth
        for layer in range(depth):
            assert weights[layer].shape == attentions[layer].shape
            torch.testing.assert_close(weights[layer], attentions[layer], atol=TOL, rtol=0)


def test_siglip_probe_attention_matches_the_pooling_head(tmp_path):
    reference = _build("siglip-vision")
    reference.save_pretrained(tmp_path)
    model = load_model(str(tmp_path)).model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = reference(pixel_values=x).last_hidden_state  # after post_layernorm
        probe = reference.head.probe.expand(2, -1, -1)
        _, expected = reference.head.attention(
            probe, hidden, hidden, need_weights=True, average_attn_weights=False
        )
        tokens, _ = model.forward_features(x)
        ours = model.map_attention(tokens)
    assert ours.shape == (2, 4, 1, 16)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_family_configs_and_labels(tmp_path):
    teacher = _build("deit-teacher")
    teacher.save_pretrained(tmp_path / "deit")
    bundle = load_model(str(tmp_path / "deit"))
    config = bundle.config
    assert (config.dist_token, config.pool, config.num_prefix_tokens) == (True, "dist", 2)
    assert bundle.labels == [teacher.config.id2label[i] for i in range(3)]
    assert "deit.embeddings.distillation_token" not in bundle.extra.get("dropped", [])
    clip = _build("clip-full")
    clip.save_pretrained(tmp_path / "clip")
    bundle = load_model(str(tmp_path / "clip"))
    config = bundle.config
    assert (config.pre_norm, config.patch_bias, config.act) == (True, False, "quick_gelu")
    assert (config.head_kind, config.num_classes, config.ln_eps) == ("projection", 16, 1e-5)
    assert any(name.startswith("text_model.") for name in bundle.extra["dropped"])
    registers = _build("dinov2-reg-classifier")
    registers.save_pretrained(tmp_path / "reg")
    config = load_model(str(tmp_path / "reg")).config
    assert (config.reg_tokens, config.no_embed_class, config.num_prefix_tokens) == (3, True, 4)
    assert (config.pool, config.pooled_dim, config.layer_scale) == ("cls+mean", 64, 1.0)


def test_family_bundle_round_trips_through_our_format(tmp_path):
    from vitcli.weights.format import save_model

    for kind in ("dinov2-reg-classifier", "siglip-vision", "clip-projection", "deit-teacher"):
        _build(kind).save_pretrained(tmp_path / kind)
        bundle = load_model(str(tmp_path / kind))
        path = save_model(bundle, tmp_path / f"{kind}.safetensors")
        again = load_model(str(path))
        assert again.config == bundle.config and again.config.family == bundle.config.family
        x = torch.randn(1, 3, 24, 40)
        with torch.no_grad():
            torch.testing.assert_close(again.model(x), bundle.model(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "model_type,family",
    [("beit", "BEiT"), ("swin", "Swin"), ("dinov3_vit", "DINOv3")],
)
def test_unsupported_families_are_refused_by_name(tmp_path, model_type, family):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(CheckpointError, match=f"{family}.*not supported; supported: ViT, DeiT"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", ["clip", "dinov2", "siglip"])
def test_preprocessing_matches_the_family_image_processor(
    tmp_path, examples_dir, family, hf_backend
):
    import numpy as np
    from PIL import Image

    from vitcli.data.images import open_image

    T = transformers
    if family == "clip":
        processor = T.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        model = _build("clip-vision")
    elif family == "dinov2":
        processor = T.BitImageProcessor(
            size={"shortest_edge": 36},
            crop_size={"height": 32, "width": 32},
            do_center_crop=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
            resample=3,
        )
        model = _build("dinov2-model")
    else:
        processor = T.SiglipImageProcessor(size={"height": 32, "width": 32})
        model = _build("siglip-vision")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    preprocess = load_model(str(tmp_path)).preprocess
    with Image.open(examples_dir / "chelsea.png") as image:
        expected = processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
    image, _ = open_image(examples_dir / "chelsea.png")
    ours = prepare(image, preprocess).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["clip-full", "siglip-vision", "dinov2-model"])
def test_config_json_without_the_class_defaults(tmp_path, kind):
    """Older config.json files leave out what equals the config class's defaults."""
    import json

    reference = _build(kind)
    reference.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    vision = config.get("vision_config", config)
    removed = []
    for key in ("hidden_act", "layer_norm_eps", "num_channels", "layerscale_value"):
        default = getattr(type(reference.config)(), key, None)
        if kind == "clip-full":
            default = getattr(transformers.CLIPVisionConfig(), key, None)
        if key in vision and vision[key] == default:
            removed.append(vision.pop(key))
    assert "layer_norm_eps" not in vision and len(removed) >= 2
    path.write_text(json.dumps(config))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, _, _ = _reference(reference, kind, x, native=True)
        torch.testing.assert_close(
            load_model(str(tmp_path)).model.embed(x), expected, atol=TOL, rtol=0
        )
