"""Does the attention look at the object? Rollout scored against known object masks.

For datasets that carry each object's mask (`vit data shapes` writes them), two scores:
- pointing game (Zhang et al., "Top-down neural attention by excitation backprop", 2016): the
  rollout's peak, the centre of its peak patch mapped back to the original image, lies on the
  object within a tolerance of 15 pixels (their standard). Reported beside it: the strict
  version (the centre pixel itself on the object) and the peak patch overlapping the object.
- mass on object: the share of the rollout's mass on the object (each patch weighted by the
  fraction of it the object covers), compared with the object's share of the image: a map
  with no idea where the object is scores a ratio near 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ...data.preprocess import Geometry
from ...errors import DatasetError
from ...runtime import default_workers
from ...weights.format import ModelBundle
from .batches import attention_batches
from .options import AttentionOptions


@dataclass
class LocalizationResult:
    images: int = 0
    correct: int = 0  # top-1 correct, from the same forward pass
    hits: int = 0  # peak cell centre within `tolerance` pixels of the object
    strict_hits: int = 0  # peak cell centre on the object
    overlap_hits: int = 0  # peak cell overlaps the object
    mass_on_object: list[float] = field(default_factory=list)
    object_share: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        n = max(self.images, 1)
        mass = float(np.mean(self.mass_on_object)) if self.mass_on_object else 0.0
        share = float(np.mean(self.object_share)) if self.object_share else 0.0
        ratios = [m / s for m, s in zip(self.mass_on_object, self.object_share) if s > 0]
        return {
            "images": self.images,
            "top1": self.correct / n,
            "pointing_game": self.hits / n,
            "pointing_game_strict": self.strict_hits / n,
            "pointing_game_overlap": self.overlap_hits / n,
            "mass_on_object": mass,
            "object_share": share,
            "mass_ratio": mass / share if share else 0.0,
            "median_image_mass_ratio": float(np.median(ratios)) if ratios else 0.0,
            "failures": len(self.failures),
        }


def mask_on_grid(mask: np.ndarray, geometry: Geometry, grid_size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of the original -> (Hp, Wp) fraction of each patch cell on the object.

    The cells cover `geometry.box` of the original (the region the model saw).
    """
    left, top, right, bottom = geometry.box
    region = Image.fromarray(mask.astype(np.uint8) * 255).crop(
        (round(left), round(top), round(right), round(bottom))
    )
    grid_h, grid_w = grid_size
    # Resample to a fine grid first, then average each cell: an area-weighted coverage.
    fine = (
        np.asarray(region.resize((grid_w * 8, grid_h * 8), Image.Resampling.BOX), dtype=np.float32)
        / 255.0
    )
    return fine.reshape(grid_h, 8, grid_w, 8).mean(axis=(1, 3))


def score_map(
    heat: np.ndarray, mask: np.ndarray, geometry: Geometry, tolerance: float = 15.0
) -> tuple[bool, bool, bool, float, float]:
    """(hit within `tolerance` px, strict hit, overlap hit, mass share on object, object share
    of the region) for one (Hp, Wp) map against an (H, W) bool mask of the original."""
    grid_h, grid_w = heat.shape
    coverage = mask_on_grid(mask, geometry, (grid_h, grid_w))
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    left, top, right, bottom = geometry.box
    cx = left + (col + 0.5) * (right - left) / grid_w
    cy = top + (row + 0.5) * (bottom - top) / grid_h
    ys, xs = np.nonzero(mask)
    distance = (
        float(np.sqrt(((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).min()))
        if len(xs)
        else float("inf")
    )
    ix = min(max(int(cx), 0), mask.shape[1] - 1)
    iy = min(max(int(cy), 0), mask.shape[0] - 1)
    strict = bool(mask[iy, ix])
    hit = strict or distance <= tolerance
    overlap = bool(coverage[row, col] > 0)
    total = float(heat.sum())
    mass = float((heat * coverage).sum() / total) if total > 0 else 0.0
    return hit, strict, overlap, mass, float(coverage.mean())


def evaluate_localization(
    bundle: ModelBundle,
    image_paths: Sequence[str],
    mask_paths: Sequence[str],
    labels: Sequence[str] | None = None,
    options: AttentionOptions | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LocalizationResult:
    """Score the rollout of every image against its mask; `labels[i]` is image i's true class.

    `options` (default: rollout, mean fusion) shape the maps; `batch_size` and `workers`
    (None: the default for this machine) replace its runtime fields.
    """
    if len(image_paths) != len(mask_paths):
        raise ValueError("one mask per image")
    if not image_paths:
        raise DatasetError("no images to score")
    options = replace(
        options or AttentionOptions(),
        methods=("rollout",),
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
    )
    result = LocalizationResult()
    for results, failures in attention_batches(bundle, list(image_paths), options):
        result.failures.extend(message for _, message in failures)
        for item in results:
            try:
                mask = np.asarray(Image.open(mask_paths[item.index]).convert("L")) > 127
            except OSError as error:
                result.failures.append(f"{mask_paths[item.index]}: cannot read mask ({error})")
                continue
            if mask.shape[::-1] != tuple(item.geometry.original_size):
                result.failures.append(
                    f"{mask_paths[item.index]}: mask size differs from its image"
                )
                continue
            hit, strict, overlap, mass, share = score_map(
                item.methods["rollout"], mask, item.geometry
            )
            result.images += 1
            result.hits += hit
            result.strict_hits += strict
            result.overlap_hits += overlap
            result.mass_on_object.append(mass)
            result.object_share.append(share)
            if labels is not None and item.top and item.top[0][1] == labels[item.index]:
                result.correct += 1
        if progress is not None:
            progress(len(results) + len(failures))
    return result


def shapes_dataset(data_dir: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(images, masks, labels) of a `vit data shapes` folder, in a stable order."""
    from ...data.inputs import natural_key
    from ...data.shapes import mask_path

    root = Path(data_dir)
    images = sorted((str(p) for p in root.glob("*/*.jpg")), key=natural_key)
    if not images:
        raise DatasetError(f"{root}: no images; generate a set with `vit data shapes {root}`")
    masks = [str(mask_path(p)) for p in images]
    missing = [m for m in masks if not Path(m).is_file()]
    if missing:
        raise DatasetError(
            f"{root}: {len(missing)} images have no mask (e.g. {missing[0]}); "
            "regenerate with `vit data shapes`"
        )
    return images, masks, [Path(p).parent.name for p in images]
