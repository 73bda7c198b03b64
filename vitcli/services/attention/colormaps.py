"""Colormap lookup tables built with numpy (matplotlib is not a dependency).

The perceptual maps (viridis, inferno, magma, plasma; van der Walt & Smith's, CC0) are stored
as 11 anchor colours at t = 0, 0.1, ..., 1 (the hex values R's viridisLite lists) and
expanded to 256 entries with Catmull-Rom interpolation, which stays within a few levels of
the published 256-entry tables. jet, hot and gray are piecewise linear.
"""

from __future__ import annotations

from functools import cache

import numpy as np

_ANCHORS = {
    "viridis": "440154 482475 414487 355f8d 2a788e 21918c 22a884 44bf70 7ad151 bddf26 fde725",
    "inferno": "000004 160b39 420a68 6a176e 932667 bc3754 dd513a f37819 fca50a f6d746 fcffa4",
    "magma": "000004 140e36 3b0f70 641a80 8c2981 b73779 de4968 f7705c fe9f6d fecf92 fcfdbf",
    "plasma": "0d0887 41049d 6a00a8 8f0da4 b12a90 cc4778 e16462 f2844b fca636 fcce25 f0f921",
}
COLORMAPS = ("viridis", "inferno", "magma", "plasma", "jet", "gray", "hot")


def _catmull_rom(anchors: np.ndarray, size: int) -> np.ndarray:
    """Uniform Catmull-Rom spline through (K, 3) anchors sampled at `size` points in [0, 1]."""
    count = len(anchors) - 1
    position = np.linspace(0.0, 1.0, size) * count
    index = np.clip(np.floor(position).astype(int), 0, count - 1)
    u = (position - index)[:, None]
    # Linear extrapolation at both ends so the end segments have a neighbour.
    padded = np.concatenate(
        [2 * anchors[:1] - anchors[1:2], anchors, 2 * anchors[-1:] - anchors[-2:-1]]
    )
    p0, p1, p2, p3 = padded[index], padded[index + 1], padded[index + 2], padded[index + 3]
    return 0.5 * (
        2 * p1
        + (p2 - p0) * u
        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u**2
        + (3 * p1 - p0 - 3 * p2 + p3) * u**3
    )


@cache
def lut(name: str, size: int = 256) -> np.ndarray:
    """(size, 3) uint8 RGB table for colormap `name`; entry 0 is the low end."""
    t = np.linspace(0.0, 1.0, size)[:, None]
    if name in _ANCHORS:
        anchors = np.array(
            [[int(code[i : i + 2], 16) for i in (0, 2, 4)] for code in _ANCHORS[name].split()],
            dtype=np.float64,
        )
        table = _catmull_rom(anchors, size)
    elif name == "jet":
        # MATLAB jet: blue -> cyan -> yellow -> red, each channel a clipped tent.
        table = 255.0 * np.clip(
            np.concatenate(
                [1.5 - np.abs(4 * t - 3), 1.5 - np.abs(4 * t - 2), 1.5 - np.abs(4 * t - 1)], axis=1
            ),
            0,
            1,
        )
    elif name == "gray":
        table = 255.0 * np.repeat(t, 3, axis=1)
    elif name == "hot":
        table = 255.0 * np.clip(np.concatenate([3 * t, 3 * t - 1, 3 * t - 2], axis=1), 0, 1)
    else:
        raise KeyError(name)
    table = np.clip(np.rint(table), 0, 255).astype(np.uint8)
    table.setflags(write=False)
    return table


def indices(values: np.ndarray, size: int = 256) -> np.ndarray:
    """Values in [0, 1] (any shape) -> the nearest of `size` table entries (intp)."""
    index = np.clip(np.rint(np.asarray(values, dtype=np.float32) * (size - 1)), 0, size - 1)
    return index.astype(np.intp)


def apply(values: np.ndarray, name: str) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    table = lut(name)
    return table[indices(values, len(table))]
