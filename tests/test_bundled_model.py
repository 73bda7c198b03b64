"""The bundled default model: present, loadable from anywhere, and as good as its card says.

The held-out set here (seed 3) is disjoint from the training (seed 0), model-selection (seed 1)
and card (seed 2) sets; it is small so the test stays fast, so its bounds sit a little below
the card's 1,200-image numbers.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitcli.data.shapes import SHAPES, generate
from vitcli.weights.locate import DEFAULT_MODEL_NAME, default_model_path
from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 12
# Measured on this set: top-1 0.986, pointing game 1.0, mass ratio 2.65 (card, 1,200 images:
# 0.996, 0.999, 2.64). The bounds are the goals.
TOP1_MIN = 0.97
POINTING_MIN = 0.85


def recipe_evaluate():
    """weights/recipe/evaluate.py, the card's held-out scores (a script, not in the package)."""
    spec = importlib.util.spec_from_file_location(
        "recipe_evaluate", ROOT / "weights" / "recipe" / "evaluate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle():
    return load_model(None)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout") / "shapes"
    generate(root, per_class=PER_CLASS, seed=3)
    return recipe_evaluate().shapes_dataset(root)


def test_bundled_model_is_the_documented_one(bundle):
    path = default_model_path()
    assert path.name == DEFAULT_MODEL_NAME
    assert path.stat().st_size <= 15 * 1024 * 1024
    config = bundle.config
    assert (config.patch_size, config.image_size, config.grid_size) == (16, (224, 224), (14, 14))
    assert sorted(bundle.labels) == sorted(SHAPES)
    assert bundle.preprocess.size == (224, 224)


def test_held_out_accuracy_and_attention_localization(bundle, held_out):
    images, masks, labels = held_out
    torch.manual_seed(0)
    result = (
        recipe_evaluate()
        .evaluate_localization(bundle, images, masks, labels=labels, workers=0)
        .to_dict()
    )
    assert result["images"] == PER_CLASS * len(SHAPES) and result["failures"] == 0
    assert result["top1"] >= TOP1_MIN, result
    assert result["pointing_game"] >= POINTING_MIN, result
    assert result["mass_ratio"] >= 2.0, result


def test_default_model_is_found_from_any_working_directory(tmp_path, held_out):
    image = held_out[0][0]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcli",
            "predict",
            image,
            "--format",
            "jsonl",
            "--top-k",
            "1",
            "--workers",
            "0",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert '"label": "circle"' in done.stdout


def test_vit_model_names_the_default_and_model_wins(tmp_path, tiny_model_file, monkeypatch):
    from vitcli.errors import ModelNotFoundError
    from vitcli.weights.resolve import load_model

    monkeypatch.setenv("VIT_MODEL", str(tiny_model_file))
    assert load_model(None).labels == load_model(str(tiny_model_file)).labels
    assert load_model("bundled").reference == "vit-shapes-p16"  # an explicit name wins
    monkeypatch.setenv("VIT_MODEL", str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelNotFoundError, match="VIT_MODEL"):
        load_model(None)


def test_bundled_model_top5_logits_on_the_star_example_are_pinned(examples_dir):
    """A change to the model code, the weights file or the preprocessing moves these numbers."""
    from vitcli.data.images import open_image
    from vitcli.data.loader import prepare

    bundle = load_model(None)
    image, size = open_image(examples_dir / "shapes-star.jpg")
    with torch.no_grad():
        logits = bundle.model(prepare(image, bundle.preprocess, size)[None])[0]
    values, indices = logits.topk(5)
    assert [bundle.labels[i] for i in indices] == ["star", "circle", "square", "triangle", "ring"]
    expected = torch.tensor([2.9405, -0.0132, -0.0336, -0.7979, -1.0231])
    assert torch.allclose(values, expected, atol=2e-3), values


def test_bundled_model_knows_both_shapes_of_a_two_shape_image(bundle, tmp_path):
    """Stage 2 of the recipe: on held-out two-shape images (seed 3, 2 per pair) both shapes are
    usually the top two classes. Measured: top-1 is one of them in 28 of 30, both on top in
    21 of 30 (card, 600 images: 95%, 76%); the stage-1 model managed about 62% and 3%."""
    from vitcli.data.loader import image_batches
    from vitcli.services.scoring import shapes_objects

    generate(tmp_path / "pairs", per_class=2, seed=3, objects=2)
    images, masks = shapes_objects(tmp_path / "pairs")
    wanted = [{bundle.labels.index(name) for name in group} for group in masks]
    top1 = both = 0
    with torch.no_grad():
        for batch in image_batches(images, bundle.preprocess, batch_size=16, workers=0):
            top = bundle.model(batch.inputs).topk(2, dim=-1).indices.tolist()
            for row, index in enumerate(batch.indices):
                top1 += top[row][0] in wanted[index]
                both += set(top[row]) == wanted[index]
    assert len(images) == 30
    assert top1 >= 25 and both >= 15, (top1, both)
