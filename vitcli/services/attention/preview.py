"""The preview index.html shows per image: one map over the original, at tile size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ...data.images import display_size
from .options import AttentionOptions
from .paint import Painter, Sampler, normalise, value_range

if TYPE_CHECKING:
    from .batches import ImageAttention

PREVIEW = "preview.png"


def preview_name(options: AttentionOptions) -> str:
    """What the previews of a run show, for index.html's legend."""
    if options.methods:
        name = options.methods[0]
        from ...explain.registry import METHODS

        if METHODS[name].class_specific:
            return f"{name} for target {options.targets[0]}"
        return name
    return "the last chosen layer's head mean"


def preview_map(result: ImageAttention) -> tuple[str, np.ndarray]:
    """(name, map) index.html shows: the first chosen method's map (rollout by default), or
    the head mean of the last chosen layer when only per-head maps were asked for."""
    if result.methods:
        key = next(iter(result.methods))
        return key, result.methods[key]
    if "probe" in result.queries:  # SigLIP: the probe's map is the class map
        return "probe · head mean", result.queries["probe"]["head_mean"][0]
    assert result.head_mean is not None
    return f"layer {result.layers[-1]} · head mean", result.head_mean[-1]


def preview(result: ImageAttention, image: Image.Image, options: AttentionOptions) -> np.ndarray:
    """(h, w, 3) uint8: the preview map over the original at tile size, scaled on its own."""
    size = display_size(result.geometry.original_size, options.tile)
    base = image.resize(size, Image.Resampling.BILINEAR) if image.size != size else image
    sampler = Sampler.build(
        result.geometry, size, result.grid_size, options.interpolation.value, options.blur
    )
    _, grid_map = preview_map(result)
    low, high = value_range([grid_map])
    painter = Painter(np.asarray(base), sampler.inside, options)
    return painter.paint(normalise(sampler(grid_map), low, high))
