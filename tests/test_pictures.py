"""Pictures people can read: `vit attention`'s colour scale, tile shapes, titles, per-head
captions, mask style and merged targets, and `vit eval`'s confusion matrix figure."""

import json

import numpy as np
import pytest
from PIL import Image

from vitcli.data.preprocess import Geometry
from vitcli.services.attention import AttentionOptions, attention_batches
from vitcli.services.attention.batches import ImageAttention, merge_duplicate_targets
from vitcli.services.attention.figure import font, middle_ellipsis, tile_size, wrap_words
from vitcli.services.attention.paint import Painter, overlay_tiles
from vitcli.services.attention.sheet import render_sheet
from vitcli.services.confusion import cell_size, confusion_figure
from vitcli.services.evaluate import ClassResult, EvalResult
from vitcli.weights.format import load_vitcli_file, save_model

LABELS = ["cat", "dog", "bird", "fish", "frog"]


def _result(size=(64, 64), **fields) -> ImageAttention:
    return ImageAttention(
        index=0,
        path="x.png",
        geometry=Geometry(original_size=size, box=(0.0, 0.0, float(size[0]), float(size[1]))),
        grid_size=(4, 4),
        top=[(0, "cat", 0.9)],
        **{"layers": [], "heads": None, "head_mean": None, **fields},
    )


def _two_targets() -> ImageAttention:
    """gae for a strong class (peak 1.0) and a weak one (peak 0.01), both on one patch."""
    strong, weak = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    strong[1, 1], weak[2, 2] = 1.0, 0.01
    return _result(
        methods={"gae.top1": strong, "gae.top2": weak},
        map_info={"gae.top1": ("gae", "top1"), "gae.top2": ("gae", "top2")},
        targets={"top1": (0, "cat", 0.9), "top2": (1, "dog", 0.05)},
    )


def test_the_weaker_targets_map_shows_by_default_and_shared_scale_dims_it():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    brightest = {}
    for scale in ("per-map", "shared"):
        options = AttentionOptions(
            scale=scale, colormap="gray", alpha=1.0, interpolation="nearest", heads=False
        )
        _, weak = overlay_tiles(_two_targets(), image, options, (64, 64))
        brightest[scale] = int(weak.pixels.max())
    assert AttentionOptions().scale.value == "per-map"
    assert brightest["per-map"] == 255 and brightest["shared"] < 10, brightest


def test_one_hot_head_no_longer_squashes_the_other_layers_heads():
    """--layer all: layer 0's head 0 peaks 100x higher than every other head; each head is
    still drawn over the whole colour range by default."""
    heads = np.zeros((3, 2, 4, 4), np.float32)  # layers, heads, Hp, Wp
    heads[:, :, 0, 0] = 0.01
    heads[0, 0, 0, 0] = 1.0
    result = _result(layers=[0, 1, 2], heads=heads, head_mean=heads.mean(axis=1))
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    options = AttentionOptions(colormap="gray", alpha=1.0, interpolation="nearest", methods=())
    tiles = overlay_tiles(result, image, options, (64, 64))
    assert len(tiles) == 9 and all(int(tile.pixels.max()) == 255 for tile in tiles)


def test_the_sheet_says_which_scale_it_uses():
    from vitcli.services.attention.heading import header_parts

    result = _two_targets()
    per_map = " ".join(header_parts(result, AttentionOptions()))
    shared = " ".join(header_parts(result, AttentionOptions(scale="shared")))
    assert "per-map scale: each tile from 0 to its own peak" in per_map
    assert "shared scale: 0 to the largest value" in shared


def test_tiles_keep_the_images_aspect_and_about_a_square_tiles_area():
    assert tile_size((500, 500), 224) == (224, 224)
    assert tile_size((1200, 300), 224) == (448, 112)  # not 224x56
    assert tile_size((300, 1200), 224) == (112, 448)
    width, height = tile_size((600, 400), 224)
    assert width / height == pytest.approx(1.5, abs=0.01)
    assert abs(width * height - 224 * 224) < 0.02 * 224 * 224
    assert tile_size((4000, 100), 100)[0] == 200  # the long side stops at 2x --tile


def test_a_wide_images_sheet_draws_wide_tiles():
    result = _result(size=(1200, 300), methods={"rollout": np.ones((4, 4), np.float32)})
    image = Image.new("RGB", (1200, 300), (200, 100, 50))
    sheet = np.asarray(render_sheet(result, image, AttentionOptions(heads=False)))
    # the original's tile: its row of (200, 100, 50) pixels is 448 wide
    rows = np.all(sheet == (200, 100, 50), axis=2)
    assert rows.sum(axis=1).max() == 448 and rows.sum(axis=0).max() == 112


def test_titles_wrap_whole_and_long_file_names_keep_their_ends():
    face = font(14)
    title = "gae · German short-haired pointer 41.2%"
    lines = wrap_words(title, face, 140)
    assert len(lines) > 1 and " ".join(lines) == title  # nothing cut
    assert all(face.getlength(line) <= 140 for line in lines)
    name = "holiday_2019_the_whole_family_at_the_beach_0042.jpg"
    short = middle_ellipsis(name, face, 200)
    assert face.getlength(short) <= 200 and "…" in short
    assert short.startswith("holiday") and short.endswith("0042.jpg")


def test_mask_style_keeps_the_photo_visible():
    photo = np.full((32, 32, 3), 200, np.uint8)
    inside = np.ones((32, 32), bool)
    nothing = np.zeros((32, 32), np.float32)  # no attention anywhere: the darkest a mask gets
    dimmed = Painter(photo, inside, AttentionOptions(style="mask")).paint(nothing)
    assert dimmed.mean() > 0.25 * 200
    paper = Painter(photo, inside, AttentionOptions(style="mask", alpha=1.0)).paint(nothing)
    assert paper.mean() == 0  # --alpha 1: the paper's black


def test_duplicate_targets_share_one_map(tmp_path, tiny_model, images_folder):
    bundle = load_vitcli_file(save_model(tiny_model, tmp_path / "m.safetensors", labels=LABELS))
    path = str(images_folder / "a.png")
    options = AttentionOptions(methods=("gae",), heads=False, workers=0)
    ((first, _),) = list(attention_batches(bundle, [path], options))
    top = first[0].top[0][0]
    both = AttentionOptions(methods=("gae",), heads=False, workers=0, targets=("top1", str(top)))
    ((results, _),) = list(attention_batches(bundle, [path], both))
    assert list(results[0].methods) == ["gae.top1"]
    assert results[0].merged_targets == {f"class{top}": "top1"}
    np.testing.assert_array_equal(results[0].methods["gae.top1"], first[0].methods["gae.top1"])


def test_merging_keeps_distinct_targets():
    result = _two_targets()
    assert merge_duplicate_targets(result) is result


def test_per_head_pngs_carry_a_caption_with_a_colour_key(tmp_path, tiny_model, images_folder):
    from vitcli.services.attention import run

    model = save_model(tiny_model, tmp_path / "m.safetensors", labels=LABELS)
    out = tmp_path / "o"
    inputs = (str(images_folder / "a.png"),)
    run(AttentionOptions(inputs=inputs, out=out, model=str(model), workers=0, per_head=True))
    meta = json.loads((out / "a" / "meta.json").read_text())
    assert meta["merged_targets"] == {}
    picture = np.asarray(Image.open(out / "a" / "layer01_head00.png").convert("RGB"))
    overlay_h = round(224 * 40 / 48)  # the 48x40 input at the 224 minimum long side
    assert picture.shape[0] > overlay_h + 40  # a strip below the overlay
    strip = picture[overlay_h:]
    assert (strip == 255).all(axis=2).mean() > 0.5  # white, with text
    viridis_low, viridis_high = np.array([68, 1, 84]), np.array([253, 231, 37])
    pixels = strip.reshape(-1, 3).astype(int)
    for end in (viridis_low, viridis_high):  # both ends of the colour key
        assert np.abs(pixels - end).sum(axis=1).min() < 30


def _eval_result(classes: int) -> EvalResult:
    labels = [f"class {i}" for i in range(classes)]
    matrix = (np.eye(classes, dtype=int) * 5).tolist()
    return EvalResult(
        model="m",
        data="d",
        images=5 * classes,
        top1=1.0,
        top5=1.0,
        classes=[ClassResult(label, 5, 5, 5) for label in labels],
        confusion=matrix,
        confusion_labels=labels,
    )


def test_the_confusion_figure_grows_with_the_classes_and_has_a_colour_bar():
    small, large = confusion_figure(_eval_result(3)), confusion_figure(_eval_result(30))
    assert cell_size(3) == 64 and cell_size(30) == 22 and cell_size(1000) == 2
    assert min(small.size) >= 3 * 64 + 150  # cells, names and title (the old one: ~270 px)
    assert large.width > small.width + 200 and large.height > small.height + 200
    pixels = np.asarray(small).reshape(-1, 3).astype(int)
    # viridis' middle (the colour bar; a 0/1 matrix has no such cell)
    assert np.abs(pixels - np.array([33, 145, 140])).sum(axis=1).min() < 30


@pytest.fixture
def images_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder
