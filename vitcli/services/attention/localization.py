"""Does a map look at the object? A map scored against a known object mask (`vit score`).

For datasets that carry each object's mask (`vit data shapes` writes them), two scores:
- pointing game (Zhang et al., "Top-down neural attention by excitation backprop", 2016): the
  map's peak, the centre of its peak patch mapped back to the original image, lies on the
  object within a tolerance of 15 pixels (their standard). Reported beside it: the strict
  version (the centre pixel itself on the object) and the peak patch overlapping the object.
- mass on object: the share of the map's mass on the object (each patch weighted by the
  fraction of it the object covers), compared with the object's share of the image: a map
  with no idea where the object is scores a ratio near 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ...data.preprocess import Geometry


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
