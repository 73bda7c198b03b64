"""`vit attention --method/--target/--explore`, the sheet's band layout and index.html."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.cli.attention import parse_method_options
from vitcli.errors import InputError, OptionError
from vitcli.explain import explain
from vitcli.model import ViTConfig
from vitcli.services.attention import AttentionOptions, run
from vitcli.services.attention.batches import compute_batch, resolve_batch_size
from vitcli.services.attention.options import default_batch_size
from vitcli.services.attention.paint import peak_ratio, range_note
from vitcli.services.attention.sheet import layout, sheet_size
from vitcli.weights.format import load_vitcli_file, save_model

LABELS = ["cat", "dog", "bird", "fish", "frog"]


@pytest.fixture
def model_file(tmp_path, tiny_model):
    return save_model(tiny_model, tmp_path / "m.safetensors", labels=LABELS)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


def invoke(*args):
    result = CliRunner().invoke(app, ["attention", *map(str, args)])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


# -- parsing ------------------------------------------------------------------------------
def test_method_option_parsing():
    assert parse_method_options(None, rollout=True) == (True, ("rollout",))
    assert parse_method_options(None, rollout=False) == (True, ())
    assert parse_method_options(["rollout"], rollout=True) == (False, ("rollout",))
    assert parse_method_options(["gae, RAW", "gradcam", "gae"], rollout=True) == (
        True,
        ("gae", "gradcam"),
    )
    with pytest.raises(InputError, match=r"unknown --method 'rolout'.*raw, rollout, gae"):
        parse_method_options(["rolout"], rollout=True)
    with pytest.raises(InputError, match="--method needs a value"):
        parse_method_options([" , "], rollout=True)


def test_options_check_methods_and_targets():
    options = AttentionOptions(methods=("raw", "gae"), heads=False)
    assert options.heads and options.methods == ("gae",)
    assert AttentionOptions(targets=("top1", "top1", " dog ")).targets == ("top1", "dog")
    with pytest.raises(InputError, match="no maps asked for"):
        AttentionOptions(methods=(), heads=False)
    with pytest.raises(InputError, match="--target needs a value"):
        AttentionOptions(targets=("",))
    with pytest.raises(InputError, match="--threshold outlines the per-head maps"):
        AttentionOptions(methods=("rollout",), heads=False, threshold=0.5)
    with pytest.raises(OptionError, match="unknown --method 'nope'"):
        AttentionOptions(methods=("nope",))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("zebra", r"--target 'zebra': not a label of this model; use top1, top2"),
        ("top9", r"--target top9: use top1\.\.top5"),
        ("7", r"--target 7 is out of range"),
    ],
)
def test_bad_targets_fail_before_anything_is_written(tmp_path, model_file, images, target, message):
    out = tmp_path / "out"
    code, output = invoke(images, "-m", model_file, "-o", out, "--method", "gae", "-t", target)
    assert code == 2 and re.search(message, " ".join(output.split())), output
    assert not out.exists()


def test_class_agnostic_methods_ignore_targets_without_checking_them(tmp_path, model_file, images):
    """--target is only read by class-specific methods (the sheet says so)."""
    code, output = invoke(images, "-m", model_file, "-o", tmp_path / "o", "-t", "zebra", "-w", "0")
    assert code == 0, output


# -- maps and their names ------------------------------------------------------------------
@pytest.mark.slow
def test_maps_are_named_by_method_and_target_and_equal_the_explain_service(
    tmp_path, model_file, images
):
    out = tmp_path / "out"
    code, output = invoke(
        images, "-m", model_file, "-o", out, "-w", "0",
        "--method", "rollout,gae", "--method", "gradcam",
        "-t", "top1", "-t", "top2", "-t", "dog", "-t", "1",  # dog is class 1: one map
    )  # fmt: skip
    assert code == 0, output
    bundle = load_vitcli_file(model_file)
    for name in ("a", "b"):
        maps = load_file(str(out / name / "maps.safetensors"))
        assert sorted(maps) == sorted(
            ["rollout"]
            + [f"{m}.{t}" for m in ("gae", "gradcam") for t in ("top1", "top2", "class1")]
        )  # no heads: --method without raw
        meta = json.loads((out / name / "meta.json").read_text())
        entries = {entry["array"]: entry for entry in meta["methods"]}
        assert entries["rollout"]["class_specific"] is False and "target" not in entries["rollout"]
        assert entries["gae.class1"]["target"]["label"] == "dog"
        top = [item["index"] for item in meta["prediction"]["top5"]]
        assert entries["gae.top1"]["target"]["index"] == top[0]
        assert entries["gradcam.top2"]["target"]["index"] == top[1]
        assert meta["options"]["methods"] == ["rollout", "gae", "gradcam"]
        assert meta["options"]["heads"] is False and "heads" not in meta["maps"]
        # The same numbers as the explain service on the same input.
        from vitcli.data.images import open_image

        picture, _ = open_image(images / f"{name}.png")
        pixels = torch.from_numpy(
            bundle.preprocess.to_uint8(bundle.preprocess.resize_image(picture))
        )[None]
        from vitcli.data.loader import normalize

        x = normalize(pixels, bundle.preprocess, torch.device("cpu"))
        expected = explain(bundle.model.eval(), x, "gae", targets=torch.tensor([1])).maps
        np.testing.assert_allclose(maps["gae.class1"], expected[0].numpy(), rtol=1e-4, atol=1e-6)


def test_default_run_keeps_heads_rollout_and_its_names(tmp_path, model_file, images):
    summary = run(
        AttentionOptions(
            inputs=(str(images),), out=tmp_path / "o", model=str(model_file), workers=0
        )
    )
    assert not summary.failures
    maps = load_file(str(tmp_path / "o" / "a" / "maps.safetensors"))
    assert sorted(maps) == ["head_mean", "heads", "layers", "prefix_mass", "rollout"]
    meta = json.loads((tmp_path / "o" / "a" / "meta.json").read_text())
    assert [entry["method"] for entry in meta["methods"]] == ["raw", "rollout"]
    assert meta["options"]["scale"] == "per-map"


def _grad_states(model, options, pixels):
    """(grad enabled, inference mode) seen by the first block on every forward call."""
    seen = []
    handle = model.blocks[0].register_forward_hook(
        lambda *_: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
    )
    try:
        compute_batch(model, pixels, options, LABELS)
    finally:
        handle.remove()
    return seen


def test_rollout_builds_no_autograd_graph_and_gae_records_the_one_forward(tiny_model):
    pixels = torch.randn(2, 3, 32, 32)
    for parameter in tiny_model.parameters():
        parameter.requires_grad_(True)  # as a freshly built model has them
    rollout = _grad_states(tiny_model, AttentionOptions(methods=("rollout",)), pixels)
    assert rollout == [(False, True)]  # one forward, in inference mode
    gae = _grad_states(tiny_model, AttentionOptions(methods=("rollout", "gae")), pixels)
    assert gae == [(True, False)]  # the one forward, recorded: no second pass for gae
    every = AttentionOptions(
        methods=("rollout", "gae", "gradcam", "attribution"), targets=("top1", "top2")
    )
    assert _grad_states(tiny_model, every, pixels) == [(True, False)]  # one, for every target
    assert all(parameter.grad is None for parameter in tiny_model.parameters())


def test_auto_batch_size_shrinks_for_class_specific_methods():
    base = ViTConfig.from_variant("B/16")
    assert default_batch_size(base) == 32
    assert default_batch_size(base, factor=4) == 12
    rollout = AttentionOptions(methods=("rollout",))
    assert resolve_batch_size(rollout, base) == 32
    assert resolve_batch_size(AttentionOptions(methods=("rollout", "gae")), base) == 12
    assert resolve_batch_size(AttentionOptions(methods=("attribution",)), base) == 9
    assert resolve_batch_size(AttentionOptions(methods=("gae",), batch_size=5), base) == 5


# -- the sheet ------------------------------------------------------------------------------
def test_layout_keeps_rows_full_and_bands_together():
    assert layout([1, 1, 5]) == (7, [(0, c) for c in range(7)])  # the bundled model's default
    columns, places = layout([1, 1, 13])  # B/16: original, rollout, 12 heads + mean
    assert columns == 5 and places[-1] == (2, 4)  # three full rows
    columns, places = layout([1, 1, 2, 2, 2])  # rollout + three methods x two targets
    assert columns == 4 and places[-1] == (1, 3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        bands = [1, *rng.integers(1, 15, size=rng.integers(1, 6)).tolist()]
        columns, places = layout(bands)
        assert 3 <= columns <= 7 or columns == sum(bands) < 3
        start = 0
        for size in bands:  # a band that fits a row is never split
            rows = {row for row, _ in places[start : start + size]}
            assert len(rows) == 1 or size > columns
            start += size
        assert len(set(places)) == len(places)


@pytest.mark.slow
def test_sheet_rows_per_method_and_target(tmp_path, model_file, images):
    """One band per method: rollout one tile, each class-specific method one per target; every
    tile says its peak; the header says the targets by name with their scores."""
    out = tmp_path / "o"
    code, output = invoke(
        images / "a.png", "-m", model_file, "-o", out, "-w", "0", "--tile", "64",
        "--method", "rollout,gae,gradcam", "-t", "top1", "-t", "top2",
    )  # fmt: skip
    assert code == 0, output
    sheet = Image.open(out / "a" / "sheet.png")
    # bands [1, 1, 2, 2] -> 6 columns, one row: width 10 + 6 * (150 + 10)
    assert sheet.width == 10 + 6 * 160
    options = AttentionOptions(methods=("rollout", "gae", "gradcam"), heads=False, tile=64)
    assert sheet_size(options, 4, 1, 5)[0] == sheet.width
    two_rows = AttentionOptions(tile=64)  # original, rollout, head mean + 4 heads: one row of 7
    assert sheet_size(two_rows, 4, 1, 1)[0] == 10 + 7 * 160


def test_sheet_text(tmp_path, model_file, images):
    from vitcli.services.attention import attention_batches
    from vitcli.services.attention.heading import title_lines

    bundle = load_vitcli_file(model_file)
    options = AttentionOptions(methods=("rollout", "gae"), targets=("top1", "frog"), workers=0)
    ((results, _),) = list(attention_batches(bundle, [str(images / "a.png")], options))
    title, subtitle = title_lines(results[0])
    top_label, top_score = results[0].top[0][1], results[0].top[0][2]
    assert f"top1 = {top_label} {top_score:.1%}" in title and "class4 = frog" in title
    assert "rollout and attention (raw): the same for every class" in subtitle
    assert "--target does not apply" in subtitle


def test_peak_over_uniform():
    assert peak_ratio(np.full((3, 4), 0.2)) == pytest.approx(1.0)
    one = np.zeros((3, 4))
    one[1, 2] = 5.0
    assert peak_ratio(one) == pytest.approx(12.0)
    assert peak_ratio(np.zeros((2, 2))) is None
    assert range_note(np.full((2, 2), 1.0)) == "peak 1.0x uniform (flat)"
    assert range_note(one) == "peak 12.0x uniform"


# -- --explore and index.html ---------------------------------------------------------------
class _Index(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.images, self.links, self.urls = 0, [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.figures += tag == "figure"
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        self.urls += [v for k, v in attrs.items() if k in ("src", "href")]


def test_explore_and_index(tmp_path, model_file, images):
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code, output = invoke(images, "-m", model_file, "-o", out, "-w", "0", "--html", "--explore")
    assert code == 1 and "broken.jpg" in output
    for name in ("a", "b"):
        page = (out / name / "explorer.html").read_text()
        data = json.loads(re.search(r"\{\"title\".*\}", page).group().replace("<\\/", "</"))
        assert data["attention"]["layers"] == [0, 1] and data["grid"] == [4, 4]
        assert data["title"] == f"{name}.png" and data["methods"] == ["attention", "rollout"]
        assert (out / name / "preview.png").is_file()
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["files"]["explorer"] == "explorer.html"
    index = _Index()
    index.feed((out / "index.html").read_text())
    assert index.figures == 2
    assert index.images == ["a/preview.png", "b/preview.png"]
    for name in ("a", "b"):
        assert {f"{name}/sheet.png", f"{name}/explorer.html", f"{name}/"} <= set(index.links)
    assert not [url for url in index.urls if ":" in url]  # relative only: no server, no network
    assert "broken.jpg" in (out / "index.html").read_text()


def test_preview_shows_the_first_method(tmp_path, model_file, images):
    out = tmp_path / "out"
    code, output = invoke(
        images / "a.png", "-m", model_file, "-o", out, "-w", "0", "--html",
        "--method", "gradcam,rollout",
    )  # fmt: skip
    assert code == 0, output
    assert "<b>gradcam for target top1</b>" in (out / "index.html").read_text()


def test_both_scales_draw_near_flat_maps_flat():
    """Heads within 1% of uniform: both scales run from 0, so they paint an even wash instead
    of stretching the 1% over the whole colormap. Each tile's note says the map is flat."""
    from vitcli.data.preprocess import Geometry
    from vitcli.services.attention.batches import ImageAttention
    from vitcli.services.attention.paint import overlay_tiles

    rng = np.random.default_rng(0)
    heads = (1.0 + 0.01 * rng.standard_normal((1, 4, 4, 4))).astype(np.float32) / 20
    result = ImageAttention(
        index=0,
        path="x.png",
        geometry=Geometry(original_size=(64, 64), box=(0.0, 0.0, 64.0, 64.0)),
        grid_size=(4, 4),
        layers=[1],
        heads=heads,
        head_mean=heads.mean(axis=1),
        top=[(0, "cat", 0.5)],
    )
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    for scale in ("shared", "per-map"):
        options = AttentionOptions(scale=scale, interpolation="nearest")
        tiles = overlay_tiles(result, image, options, (64, 64))
        assert [tile.note for tile in tiles][1:] == ["peak 1.0x uniform (flat)"] * 4
        spread = max(int(np.ptp(tile.pixels.reshape(-1, 3), axis=0).max()) for tile in tiles)
        assert spread < 20, (scale, spread)  # of 255 levels
