"""Drawing attention maps on the original image: sampling a grid onto pixels and blending.

A map lives on the (Hp, Wp) patch grid of the model input; the model input is the region
`Preprocess.geometry(...).box` of the original image, stretched (a squash maps the whole
image, a center crop a part). Each display pixel is mapped back through that box onto the
grid, so overlays sit exactly where the model looked. Sampling is separable: a (h, Hp) and a
(w, Wp) weight matrix per image, values = Wy @ map @ Wx^T, for nearest / bilinear / bicubic,
with an optional Gaussian blur folded into the same matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ...data.preprocess import Geometry
from . import colormaps
from .options import AttentionOptions, Scale

if TYPE_CHECKING:
    from .batches import ImageAttention

_OUTSIDE_KEEP = 0.3  # parts of the original the model never saw (cropped away) are washed out
_OUTSIDE_GREY = 215.0


def _cubic(distance: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5, as PIL and OpenCV)."""
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((d - 5) * d + 8) * d * a - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _gaussian_rows(weights: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a (pixels, grid) sampling matrix along the pixel axis (edges replicated)."""
    if sigma <= 0 or len(weights) == 0:
        return weights
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(weights, ((radius, radius), (0, 0)), mode="edge")
    return np.stack(
        [
            np.convolve(padded[:, column], kernel, mode="valid")
            for column in range(weights.shape[1])
        ],
        axis=1,
    )


def axis_weights(
    out_len: int,
    original_len: float,
    low: float,
    high: float,
    grid_len: int,
    interpolation: str,
    blur: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sampling matrix (out_len, grid_len) along one axis, and which output pixels are inside
    the model's region [low, high) of the original (all lengths in original pixels)."""
    centres = (np.arange(out_len) + 0.5) * (original_len / out_len)  # original-pixel coordinates
    inside = (centres >= low) & (centres < high)
    grid = (centres - low) / (high - low) * grid_len  # grid cell k spans [k, k + 1)
    weights = np.zeros((out_len, grid_len), dtype=np.float64)
    rows = np.arange(out_len)
    if interpolation == "nearest":
        np.add.at(weights, (rows, np.clip(np.floor(grid).astype(int), 0, grid_len - 1)), 1.0)
    else:
        centre = grid - 0.5  # cell centres at k + 0.5 (align_corners=False), edges replicated
        base = np.floor(centre).astype(int)
        frac = centre - base
        taps: tuple[tuple[int, np.ndarray], ...]
        if interpolation == "bilinear":
            taps = ((0, 1.0 - frac), (1, frac))
        else:
            taps = tuple((offset, _cubic(frac - offset)) for offset in (-1, 0, 1, 2))
        for offset, tap in taps:
            np.add.at(weights, (rows, np.clip(base + offset, 0, grid_len - 1)), tap)
    if blur > 0:
        # Original pixels -> output pixels. A blur wider than the picture is as flat as it
        # gets: the cap bounds the kernel, and the work (pixels x kernel), for any --blur.
        sigma = min(blur * out_len / original_len, float(out_len))
        weights[inside] = _gaussian_rows(weights[inside], sigma)
    return weights.astype(np.float32), inside


@dataclass
class Sampler:
    """Maps (Hp, Wp) grids onto an output image of `size` (width, height) of the original."""

    weights_y: np.ndarray  # (height, Hp)
    weights_x: np.ndarray  # (width, Wp)
    inside: np.ndarray  # (height, width) bool
    clip: bool

    @classmethod
    def build(
        cls,
        geometry: Geometry,
        size: tuple[int, int],
        grid_size: tuple[int, int],
        interpolation: str,
        blur: float = 0.0,
    ) -> Sampler:
        (original_w, original_h), (left, top, right, bottom) = geometry.original_size, geometry.box
        width, height = size
        weights_y, inside_y = axis_weights(
            height, original_h, top, bottom, grid_size[0], interpolation, blur
        )
        weights_x, inside_x = axis_weights(
            width, original_w, left, right, grid_size[1], interpolation, blur
        )
        return cls(
            weights_y,
            weights_x,
            inside_y[:, None] & inside_x[None, :],
            clip=interpolation == "bicubic",
        )

    def __call__(self, grid_map: np.ndarray) -> np.ndarray:
        # einsum, not @: these products are tiny, and a threaded BLAS waking up next to
        # torch's own thread pool costs tens of milliseconds on a busy machine.
        rows = np.einsum("yi,ij->yj", self.weights_y, grid_map.astype(np.float32))  # (height, Wp)
        values = np.einsum("yj,xj->yx", rows, self.weights_x)  # (height, width)
        if self.clip:  # cubic overshoot would leave the map's range
            values = np.clip(values, grid_map.min(), grid_map.max())
        return values


def value_range(maps: list[np.ndarray]) -> tuple[float, float]:
    """0..max over `maps` (below 0 only for a map with negative values). From 0, not from the
    smallest value: a near-flat map then reads as the even wash it is instead of its small
    differences being stretched over the whole colormap (the paper normalises by the max)."""
    high = max(float(m.max()) for m in maps)
    low = min(0.0, *(float(m.min()) for m in maps))
    return low, high


def normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


class Painter:
    """Blends maps onto one (h, w, 3) uint8 image.

    What every map of an image shares is computed once: the image's share of the blend, the
    colormap scaled by alpha, and the washed-out pixels outside the model's view (a center
    crop's margins), so only the window the model saw is blended per map. The arithmetic is
    the same float32 as blending map by map from scratch, so the pixels are identical.
    """

    def __init__(self, image: np.ndarray, inside: np.ndarray, options: AttentionOptions) -> None:
        self.style = options.style.value
        self.alpha = options.overlay_alpha
        rows, columns = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if rows.size == 0:  # the model saw none of these pixels
            rows, columns = np.arange(1), np.arange(1)
        self.window = (
            slice(int(rows[0]), int(rows[-1]) + 1),
            slice(int(columns[0]), int(columns[-1]) + 1),
        )
        # The view is a rectangle (the sampler's inside is rows x columns); anything else is
        # still drawn correctly, through a per-pixel choice inside the window.
        self.mask = None if inside[self.window].all() else inside[self.window][..., None]
        pixels = image[self.window].astype(np.float32)
        if self.style == "heatmap":
            self.base = pixels * np.float32(1.0 - self.alpha)
            self.colours = colormaps.lut(options.colormap.value).astype(np.float32) * np.float32(
                self.alpha
            )
        else:
            self.pixels = pixels
        self.canvas = None
        if not inside.all():
            washed = image.astype(np.float32) * _OUTSIDE_KEEP + _OUTSIDE_GREY * (
                1.0 - _OUTSIDE_KEEP
            )
            self.canvas = np.clip(washed + 0.5, 0, 255).astype(np.uint8)

    def paint(self, values: np.ndarray) -> np.ndarray:
        """(h, w) values in [0, 1] -> (h, w, 3) uint8 overlay."""
        values = values[self.window]
        if self.style == "heatmap":
            out = self.base + np.take(
                self.colours, colormaps.indices(values, len(self.colours)), axis=0
            )
        else:  # Fig. 6: the image times the normalised map
            out = self.pixels * ((1.0 - self.alpha) + self.alpha * values)[..., None].astype(
                np.float32
            )
        # A convex mix of values in [0, 255] (plus float rounding): adding 0.5 and truncating
        # rounds to nearest and stays within 0..255.
        out += 0.5
        painted = out.astype(np.uint8)
        if self.canvas is None:
            return painted
        result = self.canvas.copy()
        if self.mask is None:
            result[self.window] = painted
        else:
            result[self.window] = np.where(self.mask, painted, result[self.window])
        return result


def outline(image: np.ndarray, mask: np.ndarray, colour=(255, 255, 255)) -> np.ndarray:
    """Draw the boundary of a boolean (h, w) mask onto an (h, w, 3) image, in place."""
    edge = np.zeros_like(mask)
    vertical = mask[1:, :] != mask[:-1, :]  # a change between a pixel and the one below
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge &= mask  # the boundary pixels inside the mask, on all four sides
    image[edge] = colour
    return image


@dataclass(frozen=True)
class Tile:
    """One overlay of an image: what the sheet and the --per-head files draw."""

    stem: str  # file stem with --per-head: rollout, gae.top1, layer05_head02
    title: str  # the sheet's line above the tile
    note: str  # the line under the title: the map's real range (and its target)
    pixels: np.ndarray  # (h, w, 3) uint8
    band: str  # tiles of one band sit together on the sheet: a method, or a layer's heads


def peak_ratio(grid_map: np.ndarray) -> float | None:
    """The map's largest value over its mean (the value of a uniform map with the same total):
    1.0 for a flat map, Hp*Wp for a map on one patch; None when the map has no positive mass."""
    mean = float(grid_map.mean())
    return float(grid_map.max()) / mean if mean > 0 else None


def range_note(grid_map: np.ndarray) -> str:
    """Each tile says how peaked its map really is: colours are stretched per map or image, so
    a near-flat map would otherwise look as sure as a sharp one."""
    ratio = peak_ratio(grid_map)
    if ratio is None:
        return "no positive values"
    return f"peak {ratio:.1f}x uniform" + (" (flat)" if ratio < 1.5 else "")


def shared_ranges(result: ImageAttention) -> dict[str, tuple[float, float]]:
    """--scale shared: one range per quantity of an image, band by band: all per-head and
    head-mean maps share one, and each method's maps (its targets) share one."""
    ranges: dict[str, tuple[float, float]] = {}
    if result.heads is not None and result.head_mean is not None:
        heads = list(result.heads.reshape(-1, *result.grid_size)) + list(result.head_mean)
        ranges["raw"] = value_range(heads)
    by_method: dict[str, list[np.ndarray]] = {}
    for key, grid_map in result.methods.items():
        by_method.setdefault(result.method_of(key), []).append(grid_map)
    for method, maps in by_method.items():
        ranges[method] = value_range(maps)
    return ranges


def overlay_tiles(
    result: ImageAttention, image: Image.Image, options: AttentionOptions, size: tuple[int, int]
) -> list[Tile]:
    """Every overlay of one image at `size`, in sheet order: each method's maps (one per
    target for a class-specific one), then per layer the head mean and every head."""
    base = np.asarray(
        image.resize(size, Image.Resampling.BILINEAR) if image.size != size else image
    )
    sampler = Sampler.build(
        result.geometry, size, result.grid_size, options.interpolation.value, options.blur
    )
    contour = None
    if result.masks is not None:
        contour = Sampler.build(result.geometry, size, result.grid_size, "nearest")
    shared = shared_ranges(result) if options.scale == Scale.shared else {}

    painter = Painter(base, sampler.inside, options)

    def draw(
        grid_map: np.ndarray, scale: tuple[float, float] | None, mask: np.ndarray | None = None
    ) -> np.ndarray:
        low, high = scale or value_range([grid_map])
        pixels = painter.paint(normalise(sampler(grid_map), low, high))
        if mask is not None and contour is not None:
            outline(pixels, (contour(mask.astype(np.float32)) > 0.5) & contour.inside)
        return pixels

    tiles = []
    for key, grid_map in result.methods.items():
        method = result.method_of(key)
        target = result.target_of(key)
        if target is None:
            title = f"{method} · any class"
        else:
            title = f"{method} · {target[1]} {target[2]:.1%}"
        # A method's map is a different quantity from the raw weights: scaled on its own.
        tiles.append(
            Tile(key, title, range_note(grid_map), draw(grid_map, shared.get(method)), method)
        )
    if result.heads is None or result.head_mean is None:
        return tiles
    for position, layer in enumerate(result.layers):
        band = f"layer{layer:02d}"
        mean_map = result.head_mean[position]
        tiles.append(
            Tile(
                f"layer{layer:02d}_mean",
                f"layer {layer} · head mean",
                range_note(mean_map),
                draw(mean_map, shared.get("raw")),
                band,
            )
        )
        for head in range(result.heads.shape[1]):
            mask = result.masks[position, head] if result.masks is not None else None
            head_map = result.heads[position, head]
            tiles.append(
                Tile(
                    f"layer{layer:02d}_head{head:02d}",
                    f"layer {layer} · head {head}",
                    range_note(head_map),
                    draw(head_map, shared.get("raw"), mask),
                    band,
                )
            )
    return tiles
