"""The attention explorer page: its data, its size, and the page itself in a headless browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from vitcli.data.preprocess import Geometry
from vitcli.errors import InputError
from vitcli.services import explorer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on PATH (the page is tested in a real headless browser; "
    "install it with `apt-get install chromium`)",
)


def softmax_attention(
    layers: int, heads: int, tokens: int, seed: int = 0, sharpness: float = 3.0
) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        scores = rng.normal(scale=sharpness, size=(heads, tokens, tokens))
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[layer] = (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    match = re.search(
        r'<script id="explorer-data" type="application/json">(.*?)</script>', text, re.S
    )
    assert match, "the data element is missing"
    return json.loads(match.group(1))


def levels(part: dict, compressed: bool = True) -> np.ndarray:
    raw = base64.b64decode(part["levels"])
    return np.frombuffer(zlib.decompress(raw) if compressed else raw, dtype=np.uint8)


def floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


# -- the data ------------------------------------------------------------------------------
def test_quantised_rows_are_within_half_a_level_of_the_row_maximum():
    weights = softmax_attention(1, 2, 1 + 12, sharpness=2.0)[0]  # nh,T,T with one prefix token
    levels_, scales, prefix = explorer.quantise_rows(weights, prefix=1)
    assert levels_.shape == (2, 13, 12) and levels_.dtype == np.uint8
    np.testing.assert_array_equal(prefix[..., 0], weights[..., 0])  # prefix keys kept exactly
    restored = explorer.dequantise_rows(levels_, scales)
    error = np.abs(restored - weights[..., 1:])
    assert np.all(error <= 0.5 / 255 * scales[..., None] + 1e-7)
    assert np.all(levels_.max(axis=-1) == 255)  # every row uses the full range


def test_rollout_matrices_match_the_product_of_augmented_layers():
    attentions = softmax_attention(3, 2, 5)
    rolled = explorer.rollout_matrices(attentions, [0, 2])
    assert sorted(rolled) == [0, 2]
    steps = []
    for layer in range(3):
        step = attentions[layer].mean(axis=0) + np.eye(5)
        steps.append(step / step.sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(rolled[0], steps[0], atol=1e-6)
    np.testing.assert_allclose(rolled[2], steps[2] @ steps[1] @ steps[0], atol=1e-6)
    np.testing.assert_allclose(rolled[2].sum(axis=-1), 1.0, atol=1e-5)  # still row-stochastic
    assert explorer.rollout_matrices({1: attentions[1]}, [1]) == {}  # layer 0 missing


def test_the_page_embeds_every_row_compactly_and_escapes_the_title(tmp_path):
    grid, prefix, heads = (3, 5), 2, 3
    tokens = prefix + 15
    attentions = softmax_attention(4, heads, tokens)
    image = np.zeros((60, 100, 3), dtype=np.uint8)
    result = explorer.write_explorer(
        tmp_path / "page.html",
        image,
        None,
        attentions,
        grid_size=grid,
        layers=[1, 3],
        num_prefix_tokens=prefix,
        title="</script><b>x</b>",
        predictions=[("cat", 0.9)],
    )
    assert result.size == (tmp_path / "page.html").stat().st_size
    data = page_data(tmp_path / "page.html")
    assert data["title"] == "</script><b>x</b>"
    assert data["prefixNames"] == ["CLS", "reg 1"]
    assert data["attention"]["layers"] == [1, 3] and data["rollout"]["layers"] == [1, 3]
    stored = levels(data["attention"]).reshape(2, heads, tokens, 15)
    scales = floats(data["attention"]["scales"]).reshape(2, heads, tokens)
    expected = np.stack([attentions[1], attentions[3]])[..., prefix:]  # 2,nh,T,N
    np.testing.assert_allclose(explorer.dequantise_rows(stored, scales), expected, atol=0.002)
    prefix_weights = floats(data["attention"]["prefix"]).reshape(2, heads, tokens, prefix)
    np.testing.assert_array_equal(prefix_weights[1], attentions[3][..., :prefix])
    assert levels(data["rollout"]).size == 2 * tokens * 15
    text = (tmp_path / "page.html").read_text()
    assert "http://" not in text and "https://" not in text  # nothing from the network


def test_the_view_is_the_region_the_model_saw():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, 50:150] = 255  # the middle square is white, the sides black
    geometry = Geometry((400, 200), (100.0, 0.0, 300.0, 200.0))  # image is the original at 1/2
    view, cropped = explorer._view_image(image, geometry, long_side=640)
    assert cropped and view.size == (100, 100)
    assert np.asarray(view).min() >= 250  # only the white square the model saw
    whole, cropped = explorer._view_image(image, Geometry((200, 100), (0, 0, 200, 100)), 64)
    assert not cropped and whole.size == (64, 32)


def test_bad_inputs_are_refused(tmp_path):
    attentions = softmax_attention(1, 2, 5)
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="method"):
        explorer.write_explorer(
            tmp_path / "x.html", image, None, attentions, grid_size=(2, 2), methods=["gradcam"]
        )
    with pytest.raises(ValueError, match="expected"):
        explorer.write_explorer(tmp_path / "x.html", image, None, attentions, grid_size=(3, 3))
    with pytest.raises(InputError, match="is a folder"):
        explorer.write_explorer(tmp_path, image, None, attentions, grid_size=(2, 2))
    with pytest.raises(ValueError, match="not given"):
        explorer.write_explorer(
            tmp_path / "x.html", image, None, attentions, grid_size=(2, 2), layers=[4]
        )


def _tiny_bundle(image_size=(32, 48)):
    from vitcli.data.preprocess import Preprocess
    from vitcli.model import ViT, ViTConfig
    from vitcli.weights.format import ModelBundle

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_classes=3,
        width=32,
        depth=3,
        num_heads=2,
        mlp_dim=64,
    )
    torch.manual_seed(0)
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return ModelBundle(model, ["a", "b", "c"], Preprocess(size=image_size), reference="tiny")


def test_explore_image_from_a_model_and_a_file(tmp_path, examples_dir):
    bundle = _tiny_bundle()
    result = explorer.explore_image(
        bundle, examples_dir / "coffee.png", tmp_path / "coffee.html", layers=[-1], device="cpu"
    )
    data = page_data(result.path)
    assert data["grid"] == [4, 6] and data["tokens"] == 25 and data["numHeads"] == 2
    assert data["attention"]["layers"] == [2] and data["rollout"]["layers"] == [2]
    assert data["title"] == "coffee.png" and len(data["predictions"]) == 3
    assert data["view"]["cropped"] is False  # squash: the whole photo
    with pytest.raises(InputError, match="out of range"):
        explorer.explore_image(bundle, examples_dir / "coffee.png", tmp_path / "x.html", [3])


@pytest.mark.slow
def test_a_b16_shaped_page_stays_a_few_megabytes(tmp_path):
    attentions = softmax_attention(12, 12, 197, sharpness=1.0)  # near-uniform: compresses worst
    result = explorer.write_explorer(
        tmp_path / "b16.html",
        np.zeros((224, 224, 3), dtype=np.uint8),
        None,
        attentions,
        grid_size=(14, 14),
    )
    assert result.size < 8_000_000, result.size


# -- in a real browser -----------------------------------------------------------------------
def dump_dom(page: Path, fragment: str, tmp_path: Path) -> tuple[str, str]:
    """The page's DOM after it has run, as headless Chromium sees it: (stdout, stderr)."""
    completed = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=15000",  # lets the page inflate its maps before the dump
            "--dump-dom",
            page.resolve().as_uri() + fragment,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return completed.stdout, completed.stderr


def run_selftest(page: Path, tmp_path: Path) -> dict:
    dom, stderr = dump_dom(page, "#selftest", tmp_path)
    match = re.search(r'<pre id="selftest-result">(.*?)</pre>', dom, re.S)
    assert match, f"no self-test result in the page; chromium said: {stderr[-2000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@needs_chromium
@pytest.mark.slow
@pytest.mark.parametrize(
    ("grid", "prefix"),
    [((3, 4), 2), ((2, 2), 0)],
    ids=["non-square-cls-and-register", "no-prefix"],
)
def test_hovering_two_patches_changes_the_picture_without_errors(tmp_path, grid, prefix):
    tokens = prefix + grid[0] * grid[1]
    attentions = softmax_attention(2, 3, tokens, seed=3)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(90, 160, 3), dtype=np.uint8)
    geometry = Geometry((320, 180), (40.0, 0.0, 280.0, 180.0))  # a center crop
    page = explorer.write_explorer(
        tmp_path / "page.html",
        image,
        geometry,
        attentions,
        grid_size=grid,
        num_prefix_tokens=prefix,
        prefix_names=["<img src=x onerror=console.error(1)>"][:prefix],  # shown as text
        title="selftest",
    ).path
    report = run_selftest(page, tmp_path)
    assert report["errors"] == []
    last = prefix + grid[0] * grid[1] - 1
    assert report["queries"] == [prefix, last]  # the hovered patches: first and last
    assert report["hashes"][0] != report["hashes"][1]  # the picture changed
    assert report["mapHashes"][0] != report["mapHashes"][1]  # and so did the map itself
    assert report["ok"] is True
    if prefix:  # names reach the readout as text, never as markup
        dom, _ = dump_dom(page, "#query=0,0", tmp_path)
        readout = re.search(r'<p id="readout"[^>]*>(.*?)</p>', dom, re.S)
        assert readout and "Prefix tokens take" in readout.group(1)
        dom, _ = dump_dom(page, "", tmp_path)  # opens on the first prefix token
        readout = re.search(r'<p id="readout"[^>]*>(.*?)</p>', dom, re.S)
        assert readout and "&lt;img" in readout.group(1) and "<img" not in readout.group(1)


@needs_chromium
@pytest.mark.slow
def test_a_page_from_a_model_passes_its_selftest(tmp_path, examples_dir):
    page = explorer.explore_image(
        _tiny_bundle((32, 32)), examples_dir / "chelsea.png", tmp_path / "chelsea.html"
    ).path
    report = run_selftest(page, tmp_path)
    assert report["ok"] is True, report
