"""The synthetic shapes generator: deterministic, masks where the objects are, CLI."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from vitcli.data.shapes import SHAPES, generate, make_sample, mask_path


def test_samples_are_deterministic_and_independent_of_count():
    a = make_sample(seed=3, class_index=2, index=7, image_size=64)
    b = make_sample(seed=3, class_index=2, index=7, image_size=64)
    c = make_sample(seed=4, class_index=2, index=7, image_size=64)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.label == SHAPES[2] and a.image.size == (64, 64) and a.mask.mode == "L"


def test_mask_marks_the_object_and_only_the_object():
    for class_index in range(len(SHAPES)):
        sample = make_sample(seed=0, class_index=class_index, index=1, image_size=96)
        mask = np.asarray(sample.mask) > 0
        share = mask.mean()
        assert 0.01 < share < 0.5, (SHAPES[class_index], share)
        # Pixels under the mask differ in colour from the pixels right around it.
        image = np.asarray(sample.image, dtype=np.float32)
        inside = image[mask].mean(axis=0)
        ys, xs = np.nonzero(mask)
        ring = np.zeros_like(mask)
        ring[max(ys.min() - 4, 0) : ys.max() + 5, max(xs.min() - 4, 0) : xs.max() + 5] = True
        ring &= ~mask
        assert np.linalg.norm(inside - image[ring].mean(axis=0)) > 20


def test_generate_writes_imagefolder_layout_with_hidden_masks(tmp_path):
    summary = generate(tmp_path / "d", per_class=2, image_size=48, seed=1)
    assert summary["images"] == 12
    folders = sorted(
        p.name for p in (tmp_path / "d").iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    assert folders == sorted(SHAPES)
    images = sorted((tmp_path / "d").glob("*/*.jpg"))
    assert len(images) == 12
    for image in images:
        mask = Image.open(mask_path(image))
        assert mask.size == (48, 48) and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert json.loads((tmp_path / "d" / "shapes.json").read_text())["seed"] == 1


def test_cli_generates_and_rejects_a_file_as_out_dir(tmp_path):
    run = [sys.executable, "-m", "vitcli", "data", "shapes"]
    done = subprocess.run(
        run + [str(tmp_path / "s"), "--per-class", "1", "--image-size", "32", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "s").glob("*/*.jpg"))) == len(SHAPES)
    target = tmp_path / "file.txt"
    target.write_text("x")
    done = subprocess.run(run + [str(target)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "not a folder" in done.stderr


def test_parallel_generation_writes_the_same_files(tmp_path):
    generate(tmp_path / "one", per_class=3, image_size=40, seed=2)
    generate(tmp_path / "two", per_class=3, image_size=40, seed=2, workers=2)
    files = sorted(
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file()
    )
    assert len(files) == 3 * len(SHAPES) * 2 + 1
    for relative in files:
        assert (tmp_path / "one" / relative).read_bytes() == (
            tmp_path / "two" / relative
        ).read_bytes(), relative
