"""Preprocessing as data: the rules the home libraries use (resize sizes, crop rounding, decode
modes), refusals of what is not reproduced exactly, raw state dicts identified from evidence,
and --fast-decode said in every output. The pixel-for-pixel parity with the libraries
themselves is tests/test_fidelity.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from checkpoints import random_vit
from PIL import Image

from vitcli.data.images import open_image
from vitcli.data.preprocess import Preprocess
from vitcli.errors import CheckpointError, InputError
from vitcli.weights.recipes import hf_recipe, timm_recipe
from vitcli.weights.resolve import load_model


def test_shorter_side_resize_truncates_like_torchvision_and_transformers():
    recipe = Preprocess(size=(32, 32), resize="shorter", resize_size=(35, 35), crop="floor")
    assert recipe.resized_size(640, 479) == (46, 35)  # int(35 * 640 / 479) = int(46.76)
    assert recipe.resized_size(479, 640) == (35, 46)


def test_keep_ratio_cover_for_non_square_targets_rounds_like_timm():
    recipe = Preprocess(size=(32, 48), resize="shorter", crop_pct=0.95)  # target 33x50
    assert recipe.target_size() == (33, 50)
    ratio = min(1200 / 33, 1600 / 50)
    assert recipe.resized_size(1600, 1200) == (round(1600 / ratio), round(1200 / ratio))


@pytest.mark.parametrize(("rule", "top"), [("floor", 1), ("round", 2)])
def test_crop_offset_rule_on_an_odd_margin(rule, top):
    recipe = Preprocess(size=(32, 32), resize="shorter", resize_size=(35, 35), crop=rule)
    assert recipe.crop_box(46, 35) == (7, top, 39, top + 32)


def test_squash_then_crop_is_not_a_shorter_side_resize():
    """DeiT's processors squash to 256x256 and then crop: on a 4:3 photo the model sees the
    whole width, not a square of the middle."""
    recipe = Preprocess(size=(224, 224), resize="squash", resize_size=(256, 256), crop="floor")
    assert recipe.resized_size(1600, 1200) == (256, 256)
    geometry = recipe.geometry(1600, 1200)
    expected = (16 * 1600 / 256, 16 * 1200 / 256, 240 * 1600 / 256, 240 * 1200 / 256)
    assert geometry.box == pytest.approx(expected)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"do_resize": False}, "do_resize"),
        ({"size": {"shortest_edge": 32}, "do_center_crop": False}, "shortest_edge"),
        ({"size": {"shortest_edge": 32, "longest_edge": 64}}, "longest_edge"),
        ({"image_processor_type": "ConvNextImageProcessor"}, "image_processor_type"),
        (
            {
                "size": {"height": 24, "width": 24},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
            },
            "larger than the resized",
        ),
    ],
)
def test_hf_values_not_reproduced_exactly_are_refused_by_name(spec, field):
    with pytest.raises((CheckpointError, InputError), match=field):
        hf_recipe({"image_processor_type": "ViTImageProcessor", **spec}, "vit", "p.json")


def test_hf_recipe_reads_the_processor_class_defaults_and_says_where_each_value_came_from():
    recipe = hf_recipe({"image_processor_type": "CLIPImageProcessorFast", "size": 256}, None, "x")
    assert recipe.resize == "shorter" and recipe.resize_size == (256, 256)  # CLIP: int = edge
    assert recipe.interpolation == "bicubic" and recipe.crop == "floor"  # class default
    assert recipe.size == (224, 224) and recipe.rgb == "hf" and recipe.exif
    assert recipe.origins["size"] == "x size" and "default" in recipe.origins["resample"]
    vit = hf_recipe({"size": 40}, "vit", "x")  # ViT: an int size is a square, no crop
    assert vit.resize == "squash" and vit.size == (40, 40) and vit.rgb == "pil"


def test_hf_backend_is_transformers_default_unless_asked(monkeypatch):
    monkeypatch.delenv("VITCLI_HF_BACKEND", raising=False)
    assert hf_recipe({}, "vit", "x").backend == "torch"
    monkeypatch.setenv("VITCLI_HF_BACKEND", "pil")
    assert hf_recipe({}, "vit", "x").backend == "pil"


@pytest.mark.parametrize(
    ("cfg", "field"), [({"crop_mode": "border"}, "crop_mode"), ({"crop_pct": 1.2}, "crop_pct")]
)
def test_timm_values_not_reproduced_exactly_are_refused_by_name(cfg, field):
    with pytest.raises(CheckpointError, match=field):
        timm_recipe(cfg, (224, 224), "config.json")


def test_timm_recipe_defaults_are_resolve_data_configs():
    recipe = timm_recipe({}, (224, 224), "x")
    assert (recipe.crop_pct, recipe.interpolation, recipe.crop) == (0.875, "bicubic", "round")
    assert recipe.mean == (0.485, 0.456, 0.406) and not recipe.exif and recipe.rgb == "pil"


def test_stored_recipes_round_trip_and_old_files_read_as_vitclis_own():
    recipe = Preprocess(size=(32, 48), resize="shorter", resize_size=(50, 50), crop="floor",
                        backend="torch", exif=False, rgb="hf", rescale=1.0)  # fmt: skip
    assert Preprocess.from_dict(json.loads(recipe.to_json())) == recipe
    old = Preprocess.from_dict({"size": [32, 32], "resize": "squash", "crop_pct": 1.0,
                                "interpolation": "bilinear", "mean": [0.5] * 3,
                                "std": [0.5] * 3})  # fmt: skip
    assert (old.exif, old.rgb, old.backend, old.crop) == (True, "viewer", "pil", "round")


def _rotated_jpeg(path):
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :10] = 255  # a white band on the left of the stored pixels
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_or_not_as_the_home_does(tmp_path):
    _rotated_jpeg(tmp_path / "r.jpg")
    upright, size = open_image(tmp_path / "r.jpg", exif=True)
    stored, stored_size = open_image(tmp_path / "r.jpg", exif=False)
    assert size == (40, 80) and upright.size == (40, 80)
    assert stored_size == (80, 40) and stored.size == (80, 40)
    geometry = Preprocess(size=(32, 32), exif=False).geometry(*stored_size)
    assert geometry.exif is False  # overlays are drawn on the same, unrotated picture


def test_rgb_modes_follow_their_homes(tmp_path):
    palette = Image.fromarray(np.full((8, 8, 3), 40, np.uint8)).quantize(4)
    palette.save(tmp_path / "p.png", transparency=0)
    plain, _ = open_image(tmp_path / "p.png", rgb="pil")
    white, _ = open_image(tmp_path / "p.png", rgb="hf")
    assert np.asarray(plain).max() == 40  # PIL's convert keeps the palette colour
    assert np.asarray(white).min() == 255  # transformers' convert_to_rgb: transparent -> white
    deep = Image.fromarray(np.full((4, 4), 1000, np.uint16))
    deep.save(tmp_path / "d.png")
    assert np.asarray(open_image(tmp_path / "d.png", rgb="pil")[0]).max() == 255  # clipped
    assert np.asarray(open_image(tmp_path / "d.png", rgb="viewer")[0]).max() == 4  # scaled


# -- raw state dicts ---------------------------------------------------------------------------
def test_headless_state_dict_without_evidence_is_refused_naming_the_options(tmp_path):
    model = random_vit(num_classes=0, width=192, num_heads=3, mlp_dim=768)  # DINO's ViT-Ti
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=r"dino:.*timm:vit_small_patch16_224:"):
        load_model(str(tmp_path / "weights.pth"))
    named = load_model(f"dino:{tmp_path / 'weights.pth'}")
    assert named.config.family == "dino" and named.preprocess.resize_size == (256, 256)


def test_state_dict_with_a_head_gets_timms_defaults_for_its_architecture(tmp_path):
    model = random_vit(width=192, depth=12, num_heads=3, mlp_dim=768, image_size=32,
                       patch_size=16, num_classes=7)  # fmt: skip
    torch.save(model.state_dict(), tmp_path / "w.pth")
    bundle = load_model(str(tmp_path / "w.pth"))
    assert bundle.extra["architecture"] == "vit_tiny_patch16_32"
    pre = bundle.preprocess
    assert (pre.mean, pre.crop_pct, pre.interpolation) == ((0.5,) * 3, 0.9, "bicubic")
    assert "timm:ARCH:" in bundle.extra["note"]
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")  # DeiT's release format
    deit = load_model(str(tmp_path / "deit.pth"))
    assert deit.extra["architecture"].startswith("deit_tiny")
    assert deit.preprocess.mean == (0.485, 0.456, 0.406) and deit.preprocess.crop_pct == 0.875
    named = load_model(f"timm:deit_tiny_patch16_224:{tmp_path / 'w.pth'}")
    assert named.preprocess.crop_pct == 0.875


def test_release_file_names_are_evidence(tmp_path):
    model = random_vit(num_classes=0, width=192, num_heads=3, mlp_dim=768)
    torch.save(model.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    bundle = load_model(str(tmp_path / "dino_deitsmall16_pretrain.pth"))
    assert bundle.config.family == "dino"


# -- --fast-decode is said ---------------------------------------------------------------------
def _big_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(path, quality=90)


def test_fast_decode_is_opt_in_and_marked_in_records(tmp_path):
    from vitcli.data.inputs import collect_inputs
    from vitcli.services.predict import PredictOptions, predict_paths
    from vitcli.weights.resolve import load_bundled

    _big_jpeg(tmp_path / "big.jpg")
    bundle = load_bundled()
    items = collect_inputs([str(tmp_path / "big.jpg")])
    exact = next(predict_paths(bundle, items, PredictOptions(workers=0, logits=True, top_k=6)))
    fast = next(
        predict_paths(
            bundle, items, PredictOptions(workers=0, logits=True, top_k=6, fast_decode=True)
        )
    )
    assert "decode" not in exact and fast["decode"] == "fast"
    scores = {p["index"]: p["score"] for p in exact["predictions"]}
    moved = max(abs(p["score"] - scores[p["index"]]) for p in fast["predictions"])
    assert moved > 0  # draft decoding gives other pixels, hence other numbers


def test_fast_decode_adds_a_csv_column(tmp_path):
    from fidelity_cases import cli

    _big_jpeg(tmp_path / "big.jpg")
    out = tmp_path / "r.csv"
    done = cli("predict", str(tmp_path / "big.jpg"), "--fast-decode", "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    header, row = out.read_text().splitlines()
    assert header.endswith(",decode") and row.endswith(",fast")
