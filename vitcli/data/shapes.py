"""A deterministic synthetic dataset: coloured shapes on textured and photo-like backgrounds.

Every image has one object (or two, see below) whose pixel mask is saved too, so attention
maps can be checked against where the object really is. Image i of class c depends only on
(seed, c, i): asking for more images per class extends a set without changing the ones already
there.

Layout written under OUT_DIR (ImageFolder: one subfolder per class):
  OUT_DIR/<class>/<class>_00000.jpg     the images
  OUT_DIR/.masks/<class>/<class>_00000.png   binary object masks (255 = object), hidden so
                                           folder scans and ImageFolder readers skip them
  OUT_DIR/shapes.json                    what was generated (classes, seed, size, counts)

With two objects per image (`generate(objects=2)`, `vit data shapes --objects 2`), every
image holds two shapes of different classes, and there is one folder per pair of classes:
  OUT_DIR/<a>+<b>/<a>+<b>_00000.jpg      a and b in the order of SHAPES (circle+square)
  OUT_DIR/.masks/<a>+<b>/<a>+<b>_00000.<a>.png   the mask of the a object
  OUT_DIR/.masks/<a>+<b>/<a>+<b>_00000.<b>.png   the mask of the b object
`object_masks(image)` returns {class: mask file} for either layout.

`generate(pairs=N)` (`vit data shapes --pairs N`) writes both: the one-object class folders
and, beside them, N two-object images in each pair folder. `vit train` reads such a folder as
single-label images plus images that hold two classes at once (data/folder.py); the bundled
model is fine-tuned on one (weights/recipe/recipe.sh), so it knows both objects of an image.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..fileio import atomic_write_bytes
from ..runtime import cpu_count, die_with_parent

GENERATOR_VERSION = 3
SHAPES = ("circle", "cross", "ring", "square", "star", "triangle")
MASK_DIR = ".masks"
PAIR_SEPARATOR = "+"  # pair folders: "circle+square"
SUPERSAMPLE = 2  # shapes are drawn at 2x and reduced, for antialiased edges


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Outline on the unit circle (radius 1 around the origin)."""
    if shape in ("circle", "ring"):
        return [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 96, endpoint=False)]
    if shape == "square":
        return [(math.cos(t), math.sin(t)) for t in np.radians([45, 135, 225, 315])]
    if shape == "triangle":
        return [(math.cos(t), math.sin(t)) for t in np.radians([90, 210, 330])]
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.42
            angle = math.radians(90 + 36 * k)
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = 0.32, 1.0  # arm half-width, arm length
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(
    shape: str, size: int, center: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    """Float mask in [0, 1] of one shape, (size, size), antialiased by supersampling."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy, r = center[0] * SUPERSAMPLE, center[1] * SUPERSAMPLE, radius * SUPERSAMPLE
    outline = [
        (cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _polygon(shape)
    ]
    draw.polygon(outline, fill=255)
    if shape == "ring":
        inner = [(cx + 0.55 * r * x, cy + 0.55 * r * y) for x, y in _polygon("circle")]
        draw.polygon(inner, fill=0)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency random field in [0, 1]: a few random values upsampled bicubically."""
    coarse = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse)
    return (
        np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32).reshape(
            size, size, channels
        )
        / 255.0
    )


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: gradient, photo-like blobs, or a texture."""
    kind = rng.choice(["gradient", "photo", "stripes", "checker", "noise"])
    base, other = rng.random(3), rng.random(3)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = np.cos(theta) * xs + np.sin(theta) * ys
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        image = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "photo":
        # Soft out-of-focus scene: a couple of smooth colour fields at different scales.
        image = 0.6 * _smooth_field(rng, size, int(rng.integers(3, 6))) + 0.4 * _smooth_field(
            rng, size, int(rng.integers(6, 12))
        )
    elif kind == "stripes":
        period = rng.uniform(6, 28)
        theta = rng.uniform(0, math.pi)
        t = 0.5 + 0.5 * np.sin(
            2 * math.pi * (np.cos(theta) * xs + np.sin(theta) * ys) * size / period
        )
        image = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "checker":
        period = int(rng.integers(8, 32))
        t = ((np.arange(size)[:, None] // period + np.arange(size)[None, :] // period) % 2).astype(
            np.float32
        )
        image = base * (1 - t[..., None]) + other * t[..., None]
    else:  # coloured noise texture, slightly blurred
        noise = rng.random((size, size, 3)).astype(np.float32)
        noise = (
            np.asarray(
                Image.fromarray((noise * 255).astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0))
                ),
                dtype=np.float32,
            )
            / 255.0
        )
        image = 0.5 * base + 0.5 * noise
    if kind in ("stripes", "checker", "noise"):
        # Mute textures so the object stays the salient thing, as in a photo: at full contrast
        # a checkerboard is itself made of squares and corners, the very cues of the classes.
        mean = image.mean(axis=(0, 1), keepdims=True)
        image = mean + rng.uniform(0.2, 0.45) * (image - mean)
    return np.clip(image, 0, 1).astype(np.float32)


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image  # RGB
    mask: Image.Image  # L, 255 on the object
    label: str


def make_sample(
    seed: int, class_index: int, index: int, image_size: int = 224, classes=SHAPES
) -> ShapeSample:
    """Image `index` of class `classes[class_index]`; depends only on these arguments."""
    rng = np.random.default_rng([GENERATOR_VERSION, seed, class_index, index])
    shape = classes[class_index]
    size = image_size
    background = _background(rng, size)
    radius = rng.uniform(0.14, 0.28) * size  # object diameter 28%..56% of the image side
    margin = radius * 1.05
    center = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    angle = rng.uniform(0, 2 * math.pi)
    alpha = _shape_mask(shape, size, center, radius, angle)
    background = 0.04 + 0.56 * background  # backgrounds stay in the darker part of the range
    image = _paint(rng, background, alpha, size)
    image = image + rng.normal(0, 0.02, image.shape)  # sensor noise
    return ShapeSample(image=_rgb(image), mask=_mask(alpha), label=shape)


def _paint(rng: np.random.Generator, image: np.ndarray, alpha: np.ndarray, size: int) -> np.ndarray:
    """`image` with a shaded object of random hue where `alpha` is, lighter than under it."""
    # The object is always lighter than what is around it (any hue): with a random sign of
    # contrast no single linear feature of a patch says anything about the class, and a ViT
    # trained from scratch sits at chance for thousands of steps before it finds the shapes.
    region = image[alpha > 0.5].mean(axis=0) if (alpha > 0.5).any() else image.mean(axis=(0, 1))
    colour = rng.random(3)
    target = min(_luma(region) + rng.uniform(0.3, 0.45), 0.97)
    if _luma(colour) < target:  # mix towards white until light enough, keeping the hue
        mix = (target - _luma(colour)) / (1.0 - _luma(colour))
        colour = colour + mix * (1.0 - colour)
    shading = _smooth_field(rng, size, 3, channels=1) - 0.5
    fill = np.clip(colour[None, None, :] + 0.12 * shading, 0, 1)
    return image * (1 - alpha[..., None]) + fill * alpha[..., None]


def _rgb(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")


def _mask(alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(((alpha >= 0.5) * 255).astype(np.uint8), mode="L")


@dataclass(frozen=True)
class PairSample:
    image: Image.Image  # RGB, two objects
    masks: tuple[Image.Image, Image.Image]  # L, 255 on each object, in `labels` order
    labels: tuple[str, str]  # two different classes, in the order of `classes`


def make_pair_sample(
    seed: int,
    first: int,
    second: int,
    index: int,
    image_size: int = 224,
    classes=SHAPES,
) -> PairSample:
    """Image `index` with one `classes[first]` and one `classes[second]` (first < second).

    Both objects are smaller than single ones (diameter 24%..40% of the side) and their
    bounding circles keep a gap, so the masks never touch. Depends only on the arguments,
    and never equals a single-object image (its random stream has another key).
    """
    if not 0 <= first < second < len(classes):
        raise ValueError("a pair needs two different classes, first < second")
    rng = np.random.default_rng([GENERATOR_VERSION, seed, 2, first, second, index])
    size = image_size
    background = 0.04 + 0.56 * _background(rng, size)
    radii = [rng.uniform(0.12, 0.2) * size for _ in range(2)]
    centers: list[tuple[float, float]] = []
    for attempt in range(200):
        if attempt and attempt % 50 == 0:
            radii = [r * 0.9 for r in radii]  # crowded: shrink both and keep looking
        centers = [
            (rng.uniform(r * 1.05, size - r * 1.05), rng.uniform(r * 1.05, size - r * 1.05))
            for r in radii
        ]
        gap = math.dist(centers[0], centers[1]) - radii[0] - radii[1]
        if gap >= 0.04 * size:
            break
    image, alphas = background, []
    for class_index, center, radius in zip((first, second), centers, radii):
        alpha = _shape_mask(classes[class_index], size, center, radius, rng.uniform(0, 2 * math.pi))
        image = _paint(rng, image, alpha, size)
        alphas.append(alpha)
    image = image + rng.normal(0, 0.02, image.shape)  # sensor noise
    return PairSample(
        image=_rgb(image),
        masks=(_mask(alphas[0]), _mask(alphas[1])),
        labels=(classes[first], classes[second]),
    )


def pair_folder(first: str, second: str) -> str:
    """The folder of the images holding both classes: "circle+square"."""
    return f"{first}{PAIR_SEPARATOR}{second}"


def _write_range(
    out: Path, name: str, seed: int, start: int, stop: int, image_size: int, quality: int
) -> int:
    """Write images start..stop-1 of one class or pair folder (a unit of work for a process)."""
    image_dir, mask_dir = out / name, out / MASK_DIR / name
    for index in range(start, stop):
        stem = f"{name}_{index:05d}"
        jpeg = ("JPEG", {"quality": quality})
        png = ("PNG", {"optimize": True})
        files: list[tuple[Image.Image, Path, tuple[str, dict]]]
        if PAIR_SEPARATOR in name:
            first, second = (SHAPES.index(part) for part in name.split(PAIR_SEPARATOR))
            pair = make_pair_sample(seed, first, second, index, image_size=image_size)
            files = [(pair.image, image_dir / f"{stem}.jpg", jpeg)]
            files += [
                (mask, mask_dir / f"{stem}.{label}.png", png)
                for mask, label in zip(pair.masks, pair.labels)
            ]
        else:
            sample = make_sample(seed, SHAPES.index(name), index, image_size=image_size)
            files = [
                (sample.image, image_dir / f"{stem}.jpg", jpeg),
                (sample.mask, mask_dir / f"{stem}.png", png),
            ]
        for image, path, (form, options) in files:
            buffer = io.BytesIO()
            image.save(buffer, format=form, **options)
            atomic_write_bytes(
                path, buffer.getvalue(), durable=False
            )  # no half-written image on a kill
    return stop - start


def generate(
    out_dir: str | Path,
    per_class: int = 100,
    image_size: int = 224,
    seed: int = 0,
    classes: tuple[str, ...] = SHAPES,
    quality: int = 92,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 0,
    objects: int = 1,
    pairs: int = 0,
) -> dict:
    """Write the dataset; returns the summary also written to shapes.json.

    `workers` > 0 spreads the images over that many processes; the files are the same.
    `objects=2` writes `per_class` images for every pair of different classes instead, into
    pair folders (see the module docstring); `objects=1` writes exactly what it always did.
    `pairs` > 0 (with `objects=1`) also writes that many two-object images per pair folder.
    """
    if objects not in (1, 2):
        raise ValueError("objects must be 1 or 2")
    if pairs < 0 or (pairs and objects != 1):
        raise ValueError("pairs must be 0 or more, and only go with objects=1")
    if per_class < 1:
        raise ValueError("per_class must be at least 1")
    if image_size < 32:
        raise ValueError("image_size must be at least 32")
    if workers < 0:
        raise ValueError("workers must be 0 or more")
    unknown = sorted(set(classes) - set(SHAPES))
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    out = Path(out_dir)
    ordered = [name for name in SHAPES if name in classes]  # pairs in a fixed order
    pair_folders = [pair_folder(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :]]
    counts = (
        {name: per_class for name in classes}
        if objects == 1
        else {name: per_class for name in pair_folders}
    )
    if pairs:
        counts.update({name: pairs for name in pair_folders})
    if not counts or ((objects == 2 or pairs) and not pair_folders):
        raise ValueError("two objects per image need at least two classes")
    for name in counts:
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / MASK_DIR / name).mkdir(parents=True, exist_ok=True)
    chunk = 50
    jobs = [
        (name, start, min(start + chunk, count))
        for name, count in counts.items()
        for start in range(0, count, chunk)
    ]
    total, done = sum(counts.values()), 0
    if workers > 0 and len(jobs) > 1:
        # Never more processes than CPUs or jobs; each dies with this process (no orphans).
        count = min(workers, cpu_count(), len(jobs))
        with ProcessPoolExecutor(
            max_workers=count, initializer=die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            futures = [
                pool.submit(_write_range, out, name, seed, a, b, image_size, quality)
                for name, a, b in jobs
            ]
            for future in as_completed(futures):
                done += future.result()
                if progress is not None:
                    progress(done, total)
    else:
        for name, a, b in jobs:
            done += _write_range(out, name, seed, a, b, image_size, quality)
            if progress is not None:
                progress(done, total)
    summary = {
        "generator": "vitcli shapes",
        "generator_version": GENERATOR_VERSION,
        "classes": list(classes),
        "per_class": per_class,
        "image_size": image_size,
        "seed": seed,
        "images": total,
        "masks": MASK_DIR,
    }
    if objects == 2:
        summary["objects"] = 2
        summary["pairs"] = pair_folders
    if pairs:
        summary["pairs"] = pair_folders
        summary["per_pair"] = pairs
    atomic_write_bytes(out / "shapes.json", json.dumps(summary, indent=2).encode())
    return summary


def object_masks(image_path: str | Path) -> dict[str, Path]:
    """{class: mask file} of every object of a generated image, one or two objects."""
    image_path = Path(image_path)
    folder = image_path.parent.name
    if PAIR_SEPARATOR not in folder:
        return {folder: mask_path(image_path)}
    mask_dir = image_path.parent.parent / MASK_DIR / folder
    return {
        label: mask_dir / f"{image_path.stem}.{label}.png" for label in folder.split(PAIR_SEPARATOR)
    }


def mask_path(image_path: str | Path) -> Path:
    """The mask of a one-object image: OUT/<class>/<stem>.jpg -> OUT/.masks/<class>/<stem>.png."""
    image_path = Path(image_path)
    return image_path.parent.parent / MASK_DIR / image_path.parent.name / f"{image_path.stem}.png"
