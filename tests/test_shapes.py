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


def tree(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_one_object_is_the_default_and_unchanged(tmp_path):
    generate(tmp_path / "default", per_class=2, image_size=40, seed=4)
    generate(tmp_path / "one", per_class=2, image_size=40, seed=4, objects=1)
    assert tree(tmp_path / "default") == tree(tmp_path / "one")
    summary = json.loads((tmp_path / "one" / "shapes.json").read_text())
    assert sorted(summary) == sorted(
        ["generator", "generator_version", "classes", "per_class", "image_size", "seed"]
        + ["images", "masks"]
    )


def test_two_objects_of_different_classes_with_a_mask_each(tmp_path):
    from vitcli.data.shapes import make_pair_sample, object_masks

    summary = generate(tmp_path / "d", per_class=1, image_size=96, seed=3, objects=2)
    pairs = len(SHAPES) * (len(SHAPES) - 1) // 2
    assert summary["objects"] == 2 and summary["images"] == pairs == len(summary["pairs"])
    images = sorted((tmp_path / "d").glob("*/*.jpg"))
    assert len(images) == pairs
    for path in images:
        masks = object_masks(path)
        first, second = path.parent.name.split("+")
        assert list(masks) == [first, second] and first != second
        arrays = [np.asarray(Image.open(m)) > 127 for m in masks.values()]
        assert all(0.005 < a.mean() < 0.3 for a in arrays)
        assert not (arrays[0] & arrays[1]).any(), "the two objects never overlap"
    again = make_pair_sample(3, 0, 1, 0, image_size=96)
    assert again.labels == ("circle", "cross")
    written = object_masks(tmp_path / "d" / "circle+cross" / "circle+cross_00000.jpg")
    for mask, label in zip(again.masks, again.labels):
        assert np.array_equal(np.asarray(Image.open(written[label])), np.asarray(mask))


def test_cli_writes_two_object_sets(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "vitcli", "data", "shapes", str(tmp_path / "p")]
        + ["--per-class", "1", "--image-size", "32", "--objects", "2", "-q", "-j", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "p").glob("*+*/*.jpg"))) == 15
    assert len(list((tmp_path / "p" / ".masks").glob("*+*/*.png"))) == 30
