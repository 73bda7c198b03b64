"""`vit inspect`: Fig. 7's three quantities against known answers, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import random_vit, tiny_config
from PIL import Image

from vitcli.model import ViTConfig
from vitcli.services.inspect import analysis


# -- filters -------------------------------------------------------------------------------
def test_pca_finds_a_dominant_direction_and_fixes_its_sign():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(3, 4, 4))
    direction /= np.linalg.norm(direction)
    strengths = rng.normal(scale=10.0, size=64)
    filters = strengths[:, None, None, None] * direction + 0.01 * rng.normal(size=(64, 3, 4, 4))
    result = analysis.filter_components(filters.astype(np.float32), count=5)
    first = result.components[0]
    assert result.components.shape == (5, 3, 4, 4)
    assert abs(float((first * direction).sum())) > 0.999  # the same direction, up to sign
    flat = first.ravel()
    assert flat[np.argmax(np.abs(flat))] > 0  # sign convention: the largest entry is positive
    assert result.explained_variance_ratio[0] > 0.99
    assert np.all(np.diff(result.explained_variance_ratio) <= 1e-9)  # in order of variance
    norms = np.linalg.norm(result.components.reshape(5, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_pca_with_fewer_filters_than_components():
    filters = np.random.default_rng(1).normal(size=(6, 3, 2, 2)).astype(np.float32)
    result = analysis.filter_components(filters)  # asks for 28, only 6 samples exist
    assert result.components.shape[0] == 6
    assert result.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-5)


# -- position embeddings ---------------------------------------------------------------------
def test_similarity_of_a_hand_set_table_on_a_non_square_grid():
    grid_h, grid_w = 3, 4
    table = np.zeros((grid_h * grid_w, 8), dtype=np.float32)
    for k in range(grid_h * grid_w):
        table[k, k % grid_w] = 2.0  # one-hot by column: same column -> 1, otherwise 0
    similarity = analysis.position_similarity(table, (grid_h, grid_w))
    assert similarity.shape == (3, 4, 3, 4)
    _, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    for i in range(grid_h):
        for j in range(grid_w):
            expected = (cols == j).astype(np.float32)
            np.testing.assert_allclose(similarity[i, j], expected, atol=1e-6)


def test_similarity_rejects_a_table_of_the_wrong_length():
    with pytest.raises(ValueError, match="3x4 grid"):
        analysis.position_similarity(np.ones((11, 4)), (3, 4))


def test_position_table_drops_the_cls_row_and_reads_sincos_models():
    learned = random_vit()
    table = analysis.position_table(learned)
    np.testing.assert_array_equal(table, learned.pos_embed.detach().numpy()[0, 1:])
    fixed = random_vit(pos_embed="sincos2d")
    np.testing.assert_allclose(
        analysis.position_table(fixed), fixed.pos_embed.numpy()[0, 1:], atol=1e-6
    )


# -- attention distance ----------------------------------------------------------------------
def _neighbour_attention(grid_h: int, grid_w: int, prefix: int, prefix_mass: float):
    """Every patch query attends to its right neighbour (the last column: its left one),
    with `prefix_mass` of each row on the first prefix token."""
    tokens = prefix + grid_h * grid_w
    weights = torch.zeros(1, 2, tokens, tokens)
    for q in range(grid_h * grid_w):
        col = q % grid_w
        target = q + 1 if col < grid_w - 1 else q - 1
        weights[:, :, prefix + q, prefix + target] = 1.0 - prefix_mass
        if prefix:
            weights[:, :, prefix + q, 0] = prefix_mass
    weights[:, :, :prefix, :] = 1.0 / tokens  # prefix queries do not count
    return weights


def test_neighbour_attention_is_exactly_one_patch_away():
    weights = _neighbour_attention(3, 5, prefix=1, prefix_mass=0.7)
    distance = analysis.attention_distance(weights, (3, 5), patch_size=16, num_prefix_tokens=1)
    assert distance.shape == (1, 2)
    torch.testing.assert_close(distance, torch.full((1, 2), 16.0, dtype=torch.float64))


def test_distance_is_euclidean_in_pixels():
    grid = (4, 4)
    weights = torch.zeros(1, 1, 16, 16)
    weights[0, 0, :, 15] = 1.0  # everyone attends to the bottom-right patch (3, 3)
    distance = analysis.attention_distance(weights, grid, patch_size=8, num_prefix_tokens=0)
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    expected = 8 * np.hypot(3 - rows, 3 - cols).mean()
    assert float(distance) == pytest.approx(expected)


def test_a_model_with_uniform_attention_gives_the_uniform_distance():
    from vitcli.data.preprocess import Preprocess
    from vitcli.services.inspect import ImageSet, attention_distances
    from vitcli.weights.format import ModelBundle

    config = tiny_config(image_size=(32, 48))  # a 4x6 grid
    model = random_vit(image_size=(32, 48))
    with torch.no_grad():
        for block in model.blocks:  # q = k = 0: softmax of zeros is uniform over all tokens
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()
    bundle = ModelBundle(model, list("abcde"), Preprocess(size=config.image_size))
    images = ImageSet(
        "generated", "noise", generated=[Image.new("RGB", (48, 32), (9, 99, 199))] * 3
    )
    per_image, failures = attention_distances(bundle, images, batch_size=2, device="cpu")
    assert failures == []
    assert per_image.shape == (3, config.depth, config.num_heads)
    np.testing.assert_allclose(per_image, analysis.uniform_distance((4, 6), 8), rtol=1e-5)


# -- the command ---------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_cli_writes_the_three_panels_and_the_numbers(tmp_path, tiny_model_file, image_folder):
    from typer.testing import CliRunner

    from vitcli.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["inspect", "--model", str(tiny_model_file), "--images", str(image_folder)]
        + ["--out", str(out), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    for name in ("filters_pca.png", "position_similarity.png", "attention_distance.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    report = json.loads((out / "inspect.json").read_text())
    distance = report["attention_distance"]
    assert distance["images"]["count"] == 3  # the broken file is skipped and listed
    assert [f["path"] for f in distance["images"]["failed"]] == [str(image_folder / "broken.jpg")]
    assert np.asarray(distance["per_layer_head"]).shape == (2, 4)
    assert "renormalised" in distance["definition"]
    from safetensors.numpy import load_file

    arrays = load_file(out / "inspect.safetensors")
    assert arrays["position_similarity"].shape == (4, 4, 4, 4)
    assert arrays["filter_components"].shape == (28, 3, 8, 8)
    assert arrays["attention_distance_per_image"].shape == (3, 2, 4)
    assert "broken.jpg" in result.output


def test_cli_without_images_uses_a_default_set_and_says_which(tmp_path, tiny_model_file):
    from typer.testing import CliRunner

    from vitcli.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["inspect", "--model", str(tiny_model_file), "--out", str(out), "--max-images", "2"],
    )
    assert result.exit_code == 0, result.output
    images = json.loads((out / "inspect.json").read_text())["attention_distance"]["images"]
    assert images["count"] == 2 and images["source"] in ("examples", "generated")
    assert images["description"] in result.output


def test_generated_images_when_there_is_no_examples_folder(monkeypatch, tmp_path):
    import vitcli.services.inspect as inspect_service

    monkeypatch.setattr(inspect_service, "_EXAMPLES", tmp_path / "nowhere")
    chosen = inspect_service.choose_images(None, image_size=32, limit=5)
    assert chosen.source == "generated" and len(chosen) == 5
    assert chosen.generated[0].size == (32, 32)


def test_cli_refuses_a_folder_without_images(tmp_path, tiny_model_file):
    from typer.testing import CliRunner

    from vitcli.cli import app

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        app,
        ["inspect", "--model", str(tiny_model_file), "--images", str(empty)]
        + ["--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 1
    assert "no images found" in result.output
    assert not (tmp_path / "out").exists()  # nothing created for a mistake


def test_images_inside_the_output_folder_are_left_out(tmp_path, image_folder):
    from vitcli.services.inspect import choose_images

    out = image_folder / "inspect"
    out.mkdir()
    Image.new("RGB", (40, 40)).save(out / "filters_pca.png")  # a previous run's output
    chosen = choose_images(image_folder, image_size=32, limit=100, exclude=out)
    names = sorted(Path(p).name for p in chosen.paths)
    assert names == ["broken.jpg", "img0.png", "img1.png", "img2.png"]


def test_large_models_get_smaller_batches():
    from vitcli.services.inspect import default_batch_size

    assert default_batch_size(ViTConfig.from_variant("B/16")) == 16
    assert default_batch_size(ViTConfig.from_variant("L/16", image_size=384)) == 2


@pytest.mark.parametrize(
    ("option", "message"),
    [("--max-images", "--max-images must be at least 1"), ("-b", "--batch-size must be")],
)
def test_cli_refuses_zero_counts_before_writing(tmp_path, tiny_model_file, option, message):
    from typer.testing import CliRunner

    from vitcli.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["inspect", "--model", str(tiny_model_file), "--out", str(out), option, "0"]
    )
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()
