"""Drawing attention maps on the original image and writing everything to disk.

A map lives on the (Hp, Wp) patch grid of the model input; the model input is the region
`Preprocess.geometry(...).box` of the original image, stretched (a squash maps the whole
image, a center crop a part). Each display pixel is mapped back through that box onto the
grid, so overlays sit exactly where the model looked. Sampling is separable: a (h, Hp) and a
(w, Wp) weight matrix per image, values = Wy @ map @ Wx^T, for nearest / bilinear / bicubic,
with an optional Gaussian blur folded into the same matrices.

Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import struct
import threading
import urllib.parse
import zlib
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .._version import __version__
from ..data.images import display_size, open_image
from ..data.preprocess import Geometry
from ..errors import ImageDecodeError, InputError, VitError
from ..fileio import atomic_write_bytes
from ..weights.format import ModelBundle
from . import colormaps

STYLES = ("heatmap", "mask")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
SCALES = ("per-map", "shared")
MAPS_FORMATS = ("safetensors", "npy")
TOKEN_ORDER = "[CLS, patch_0, ..., patch_{N-1}]; patch k covers grid row k // Wp, column k % Wp"

MAX_COLUMNS = 7  # tiles per sheet row
_OUTSIDE_KEEP = 0.3  # parts of the original the model never saw (cropped away) are washed out
_OUTSIDE_GREY = 215.0


class RenderError(VitError):
    """One image whose outputs could not be drawn or written; the run records it and goes on."""


@dataclass(frozen=True)
class RenderOptions:
    style: str = (
        "heatmap"  # heatmap: colormap blended with alpha; mask: image dimmed where attention is low
    )
    colormap: str = "viridis"
    alpha: float | None = None  # None: 0.5 for heatmap, 1.0 for mask (the paper's Fig. 6)
    interpolation: str = "bilinear"  # nearest shows the true patch blocks
    scale: str = "per-map"  # or "shared": one range for all head and head-mean maps of an image
    blur: float = 0.0  # Gaussian sigma in original pixels (the paper blurs with ~P)
    tile: int = 224  # long side of a sheet tile, pixels
    individual_size: int = 1024  # cap on the long side of --per-head PNGs

    def __post_init__(self) -> None:
        def check(value, allowed, option):
            if value not in allowed:
                raise InputError(f"unknown {option} {value!r}: use one of {', '.join(allowed)}")

        check(self.style, STYLES, "--style")
        check(self.colormap, colormaps.COLORMAPS, "--colormap")
        check(self.interpolation, INTERPOLATIONS, "--interpolation")
        check(self.scale, SCALES, "--scale")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.blur < 0:
            raise InputError(f"--blur must be 0 or more (pixels of the original), got {self.blur}")
        if self.tile < 32:
            raise InputError(f"--tile must be at least 32 pixels, got {self.tile}")

    @property
    def effective_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.5 if self.style == "heatmap" else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["alpha"] = self.effective_alpha
        return data


# -- sampling a grid map onto pixels ------------------------------------------------------
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
        if interpolation == "bilinear":
            taps = ((0, 1.0 - frac), (1, frac))
        else:
            taps = tuple((offset, _cubic(frac - offset)) for offset in (-1, 0, 1, 2))
        for offset, tap in taps:
            np.add.at(weights, (rows, np.clip(base + offset, 0, grid_len - 1)), tap)
    if blur > 0:
        sigma = blur * out_len / original_len  # original pixels -> output pixels
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


def map_to_pixels(
    grid_map: np.ndarray,
    geometry: Geometry,
    size: tuple[int, int],
    interpolation: str = "bilinear",
    blur: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(Hp, Wp) map -> ((height, width) values, (height, width) inside-the-model's-view mask)."""
    sampler = Sampler.build(geometry, size, grid_map.shape, interpolation, blur)
    return sampler(grid_map), sampler.inside


def value_range(maps: list[np.ndarray], style: str) -> tuple[float, float]:
    """Heatmaps stretch min..max; masks use 0..max (the paper normalises by the max)."""
    high = max(float(m.max()) for m in maps)
    low = 0.0 if style == "mask" else min(float(m.min()) for m in maps)
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

    def __init__(self, image: np.ndarray, inside: np.ndarray, options: RenderOptions) -> None:
        self.style = options.style
        self.alpha = options.effective_alpha
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
            self.colours = colormaps.lut(options.colormap).astype(np.float32) * np.float32(
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


def blend(
    image: np.ndarray, values: np.ndarray, inside: np.ndarray, options: RenderOptions
) -> np.ndarray:
    """(h, w, 3) uint8 image + (h, w) values in [0, 1] -> (h, w, 3) uint8 overlay."""
    return Painter(image, inside, options).paint(values)


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


# -- fonts and text -----------------------------------------------------------------------
@cache
def font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType font, Pillow >= 10.1
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def _wrap(parts: list[str], face, width: float, separator: str = "  ·  ") -> list[str]:
    """Join `parts` with `separator` into as few lines as fit `width` (a part never splits)."""
    lines: list[str] = []
    for part in parts:
        if lines and face.getlength(lines[-1] + separator + part) <= width:
            lines[-1] += separator + part
        else:
            lines.append(_fit(part, face, width))
    return lines


def _fit(text: str, face, width: float) -> str:
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


# -- the sheet ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunContext:
    """What every image of a run shares: model facts for meta.json and the options."""

    model: dict
    preprocess: dict
    patch_size: int
    num_heads: int
    options: dict
    render: RenderOptions
    maps_format: str = "safetensors"
    per_head: bool = False

    @classmethod
    def from_bundle(
        cls, bundle: ModelBundle, options, render: RenderOptions, maps_format: str, per_head: bool
    ):
        config = bundle.config
        model = {
            "reference": bundle.reference,
            "format": bundle.source_format,
            "name": config.name,
            "config": config.to_dict(),
        }
        return cls(
            model=model,
            preprocess=bundle.preprocess.to_dict(),
            patch_size=config.patch_size,
            num_heads=config.num_heads,
            options=options.to_dict(),
            render=render,
            maps_format=maps_format,
            per_head=per_head,
        )


@dataclass
class Tile:
    title: str
    pixels: np.ndarray  # (h, w, 3) uint8


def overlay_tiles(
    result, image: Image.Image, options: RenderOptions, size: tuple[int, int]
) -> list[tuple[str, str, np.ndarray]]:
    """Every overlay of one image at `size`: (file stem, title, pixels) in sheet order."""
    base = np.asarray(
        image.resize(size, Image.Resampling.BILINEAR) if image.size != size else image
    )
    sampler = Sampler.build(
        result.geometry, size, result.grid_size, options.interpolation, options.blur
    )
    contour = None
    if result.masks is not None:
        contour = Sampler.build(result.geometry, size, result.grid_size, "nearest")
    shared = None
    if options.scale == "shared":
        shared = value_range(
            list(result.heads.reshape(-1, *result.grid_size)) + list(result.head_mean),
            options.style,
        )

    painter = Painter(base, sampler.inside, options)

    def draw(
        grid_map: np.ndarray, scale: tuple[float, float] | None, mask: np.ndarray | None = None
    ) -> np.ndarray:
        low, high = scale or value_range([grid_map], options.style)
        pixels = painter.paint(normalise(sampler(grid_map), low, high))
        if mask is not None and contour is not None:
            outline(pixels, (contour(mask.astype(np.float32)) > 0.5) & contour.inside)
        return pixels

    tiles = []
    if result.rollout is not None:
        # Rollout is a different quantity from the raw weights: always scaled on its own.
        tiles.append(("rollout", "rollout", draw(result.rollout, None)))
    for position, layer in enumerate(result.layers):
        tiles.append(
            (
                f"layer{layer:02d}_mean",
                f"layer {layer} · mean",
                draw(result.head_mean[position], shared),
            )
        )
        for head in range(result.heads.shape[1]):
            mask = result.masks[position, head] if result.masks is not None else None
            tiles.append(
                (
                    f"layer{layer:02d}_head{head:02d}",
                    f"layer {layer} · head {head}",
                    draw(result.heads[position, head], shared, mask),
                )
            )
    return tiles


def render_sheet(result, image: Image.Image, context: RunContext) -> Image.Image:
    """original | rollout on the first row, then per chosen layer: head mean | head 0 ... nh-1."""
    options = context.render
    size = display_size(result.geometry.original_size, options.tile)
    if image.size != size:
        image = image.resize(
            size, Image.Resampling.BILINEAR
        )  # once, for the original and the overlays
    tiles = overlay_tiles(result, image, options, size)
    original = np.array(image)
    box_left, box_top, box_right, box_bottom = result.geometry.box
    original_w, original_h = result.geometry.original_size
    full = box_left <= 0 and box_top <= 0 and box_right >= original_w and box_bottom >= original_h
    per_layer = result.heads.shape[1] + 1  # head mean + every head
    columns = min(per_layer, MAX_COLUMNS)  # many heads (B: 12, L: 16) wrap onto more rows
    rows: list[list[tuple[str, np.ndarray]]] = [[("original", original)]]
    rest = tiles
    if result.rollout is not None:
        rows[0].append(("rollout", tiles[0][2]))
        rest = tiles[1:]
    for layer_start in range(0, len(rest), per_layer):  # each layer starts a new row
        layer_tiles = rest[layer_start : layer_start + per_layer]
        for start in range(0, len(layer_tiles), columns):
            rows.append(
                [(title, pixels) for _, title, pixels in layer_tiles[start : start + columns]]
            )

    # Header: top-1, file, and the options that shape what is shown (wrapped to the width).
    parts = []
    if result.rollout is not None:
        parts.append(
            f"rollout: {context.options['head_fusion']} over heads, discard {context.options['discard_ratio']:g}"
        )
    parts.append(
        f"{options.style}" + (f" {options.colormap}" if options.style == "heatmap" else "")
    )
    parts.append(f"{options.interpolation}, {options.scale} scale")
    parts.append(f"grid {result.grid_size[0]}x{result.grid_size[1]}")
    if result.query != "cls":
        parts.append("no CLS token: mean over queries")
    if context.options.get("threshold") is not None:
        parts.append(
            f"outline: top patches with {context.options['threshold']:g} of each head's mass"
        )
    titles = tuple(tuple(title for title, _ in row) for row in rows)
    index, label, score = result.top[0]
    with _TEXT_LOCK:  # one FreeType face is shared by the rendering threads
        template, layout = _sheet_template(
            size,
            columns,
            titles,
            tuple(parts),
            options.colormap if options.style == "heatmap" else "",
        )
        sheet = template.copy()
        draw = ImageDraw.Draw(sheet)
        text_w, pad = layout["text_w"], _PAD
        draw.text(
            (pad, 8),
            _fit(f"{label}  {score:.1%}", font(20), text_w),
            fill=(20, 20, 20),
            font=font(20),
        )
        draw.text(
            (pad, 38),
            _fit(f"{Path(result.path).name}  ·  top-1 class {index}", font(13), text_w),
            fill=(70, 70, 70),
            font=font(13),
        )
    for row, row_tiles in zip(layout["cells"], rows):
        for (tile_x, tile_y), (title, pixels) in zip(row, row_tiles):
            sheet.paste(Image.fromarray(pixels), (tile_x, tile_y))
            if title == "original" and not full:
                scale_x, scale_y = size[0] / original_w, size[1] / original_h
                draw.rectangle(
                    [
                        tile_x + box_left * scale_x,
                        tile_y + box_top * scale_y,
                        tile_x + box_right * scale_x - 1,
                        tile_y + box_bottom * scale_y - 1,
                    ],
                    outline=(255, 64, 64),
                    width=2,
                )
    return sheet


_PAD, _TITLE_H = 10, 22
_TEXT_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _sheet_template(
    size: tuple[int, int], columns: int, titles: tuple, parts: tuple, colormap: str
):
    """The parts of a sheet every image of a run shares (titles, option lines, colour bar),
    drawn once: text rendering is a good share of the time of a sheet otherwise."""
    pad, title_h = _PAD, _TITLE_H
    small_font = font(13)
    cell_w = max(size[0], 150)
    cell_h = title_h + size[1]
    sheet_w = pad + max(columns, 2) * (cell_w + pad)
    colourbar_w = 170 if colormap else 0
    option_lines = _wrap(
        list(parts), small_font, sheet_w - 2 * pad
    )  # below the colour bar: full width
    header_h = 60 + 18 * len(option_lines) + 6
    sheet = Image.new(
        "RGB", (sheet_w, header_h + len(titles) * (cell_h + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for number, line in enumerate(option_lines):
        draw.text((pad, 58 + 18 * number), line, fill=(110, 110, 110), font=small_font)
    if colourbar_w:
        bar = colormaps.apply(np.linspace(0, 1, colourbar_w - 40)[None, :].repeat(12, 0), colormap)
        bar_x = sheet_w - pad - colourbar_w + 20
        sheet.paste(Image.fromarray(bar), (bar_x, 14))
        draw.text((bar_x, 30), "low", fill=(90, 90, 90), font=small_font)
        draw.text(
            (bar_x + bar.shape[1], 30), "high", fill=(90, 90, 90), font=small_font, anchor="ra"
        )
    draw.line([(pad, header_h - 4), (sheet_w - pad, header_h - 4)], fill=(220, 220, 220), width=1)
    cells = []
    for row_index, row in enumerate(titles):
        y = header_h + row_index * (cell_h + pad)
        positions = []
        for column, title in enumerate(row):
            x = pad + column * (cell_w + pad)
            draw.text(
                (x + cell_w / 2, y + 2),
                _fit(title, font(14), cell_w),
                fill=(30, 30, 30),
                font=font(14),
                anchor="ma",
            )
            positions.append((x + (cell_w - size[0]) // 2, y + title_h))
        cells.append(positions)
    text_w = sheet_w - 2 * pad - colourbar_w - (pad if colourbar_w else 0)
    return sheet, {"cells": cells, "text_w": text_w}


# -- writing ------------------------------------------------------------------------------
@dataclass
class IndexEntry:
    path: str
    name: str
    label: str | None = None
    score: float | None = None
    error: str | None = None


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def output_names(paths: list[str]) -> list[str]:
    """One folder name per input, in input order: the stem, then stem-2, stem-3 on collisions
    (compared case-insensitively). Failed inputs keep their name so names never shift."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = _UNSAFE.sub("_", Path(path).stem).strip().lstrip(".") or "image"
        name, counter = stem, 1
        while name.lower() in used:
            counter += 1
            name = f"{stem}-{counter}"
        used.add(name.lower())
        names.append(name)
    return names


def prepare_out_dir(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a folder; pick another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"--out {out_dir}: cannot create the folder ({error.strerror or error}); pick another --out"
        ) from None
    return out_dir


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """An 8-bit RGB PNG of `image`, made for speed: a sheet is written per input image.

    Every row gets PNG's "Up" filter (the difference to the row above, computed in one numpy
    subtraction; the first row's "above" is zeros, so it is stored as is), then zlib deflates
    at level 1 with its run-length strategy. Pillow's encoder picks among four filters row by
    row, which takes about as long as the compression itself: this writes a sheet in ~0.6x
    the time of Pillow at level 1 for files ~10% larger. Any PNG reader decodes it exactly.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ValueError(
            f"png_bytes needs a non-empty (h, w, 3) uint8 array, got {pixels.dtype} {pixels.shape}"
        )
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines it
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = compressor.compress(filtered.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def write_atomic(path: Path, data: bytes) -> None:
    """Atomic, without fsync: a sheet is cheap to redo and a run writes thousands of files."""
    atomic_write_bytes(path, data, durable=False)


def maps_arrays(result) -> dict[str, np.ndarray]:
    arrays = {
        "heads": np.ascontiguousarray(result.heads, dtype=np.float32),  # layers, nh, Hp, Wp
        "head_mean": np.ascontiguousarray(result.head_mean, dtype=np.float32),  # layers, Hp, Wp
        "layers": np.asarray(result.layers, dtype=np.int64),
    }
    if result.rollout is not None:
        arrays["rollout"] = np.ascontiguousarray(result.rollout, dtype=np.float32)  # Hp, Wp
    if result.masks is not None:
        arrays["masks"] = np.ascontiguousarray(result.masks, dtype=np.uint8)  # layers, nh, Hp, Wp
    return arrays


def _write_maps(
    folder: Path, arrays: dict[str, np.ndarray], maps_format: str, metadata: dict
) -> list[str]:
    if maps_format == "safetensors":
        from safetensors.numpy import save

        write_atomic(
            folder / "maps.safetensors",
            save(arrays, metadata={k: json.dumps(v) for k, v in metadata.items()}),
        )
        return ["maps.safetensors"]
    written = []
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_atomic(folder / f"{name}.npy", buffer.getvalue())
        written.append(f"{name}.npy")
    return written


def _load_original(path: str, long_side: int) -> Image.Image:
    def draft_for(width: int, height: int) -> tuple[int, int]:
        return display_size((width, height), min(long_side, max(width, height)))

    image, _ = open_image(path, draft_for=draft_for)
    return image


def _display_fits(result, tile: int) -> bool:
    """Whether the decoder's display image is what a fresh decode would give the sheet: scaled
    to the tile exactly, or the whole original when that is no larger. (A model whose JPEG
    draft decode came out smaller than the tile sends less; then the file is read again.)"""
    if result.display is None:
        return False
    size = (result.display.shape[1], result.display.shape[0])
    return size == display_size(result.geometry.original_size, tile) or size == tuple(
        result.geometry.original_size
    )


def write_image_outputs(result, folder: Path, context: RunContext) -> IndexEntry:
    """sheet.png, the maps, meta.json (and per-head PNGs) for one image, each file atomic."""
    options = context.render
    try:
        original_long = max(result.geometry.original_size)
        individual_long = min(max(original_long, options.tile), options.individual_size)
        needed = max(options.tile, individual_long if context.per_head else 0)
        if _display_fits(result, options.tile) and not context.per_head:
            # The decoding worker already made the sheet-sized original: no second decode.
            image = Image.fromarray(result.display)
        else:
            image = _load_original(result.path, needed)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict = {"sheet": "sheet.png"}
        write_atomic(folder / "sheet.png", png_bytes(render_sheet(result, image, context)))
        if context.per_head:
            size = display_size(result.geometry.original_size, individual_long)
            individual = []
            for stem, _, pixels in overlay_tiles(result, image, options, size):
                write_atomic(folder / f"{stem}.png", png_bytes(pixels))
                individual.append(f"{stem}.png")
            files["per_head"] = individual
        arrays = maps_arrays(result)
        grid = list(result.grid_size)
        files["maps"] = _write_maps(
            folder,
            arrays,
            context.maps_format,
            {"layers": result.layers, "grid": grid, "token_order": TOKEN_ORDER},
        )
        index, label, score = result.top[0]
        query_note = (
            "CLS query row over the patch keys, A[b, h, 0, 1:]"
            if result.query == "cls"
            else "the model has no CLS token: mean over all query tokens of A[b, h, :, :] (and of the rollout rows)"
        )
        meta = {
            "vitcli_version": __version__,
            "input": result.path,
            "model": context.model,
            "preprocess": context.preprocess,
            "geometry": {
                "original_size": list(result.geometry.original_size),
                "box": [float(v) for v in result.geometry.box],
                "note": "the model input is this (left, top, right, bottom) region of the original, stretched",
            },
            "prediction": {
                "index": index,
                "label": label,
                "score": score,
                "top5": [{"index": i, "label": l, "score": s} for i, l, s in result.top],
            },
            "options": {
                **context.options,
                **options.to_dict(),
                "maps_format": context.maps_format,
                "per_head": context.per_head,
            },
            "layers": list(result.layers),
            "num_heads": int(result.heads.shape[1]),
            "patch_size": context.patch_size,
            "grid": grid,
            "token_order": TOKEN_ORDER,
            "query": result.query,
            "query_note": query_note,
            "maps": {name: list(array.shape) for name, array in arrays.items()},
            "files": files,
        }
        write_atomic(
            folder / "meta.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
        )
    except ImageDecodeError as error:
        raise RenderError(str(error)) from None
    except OSError as error:
        raise RenderError(
            f"{result.path}: cannot write outputs to {folder} ({error.strerror or error})"
        ) from None
    return IndexEntry(path=result.path, name=folder.name, label=label, score=score)


def write_index_html(out_dir: Path, entries: list[IndexEntry], context: RunContext) -> Path:
    """A contact sheet linking every sheet.png, in input order; failures listed at the end."""
    figures, failures = [], []
    for entry in entries:
        if entry.error is not None:
            failures.append(
                f"<li><code>{html.escape(entry.path)}</code>: {html.escape(entry.error)}</li>"
            )
            continue
        href = html.escape(urllib.parse.quote(entry.name) + "/sheet.png", quote=True)
        folder = html.escape(urllib.parse.quote(entry.name) + "/", quote=True)
        figures.append(
            f'<figure><a href="{href}"><img src="{href}" loading="lazy" alt="{html.escape(entry.name, quote=True)}"></a>'
            f"<figcaption><b>{html.escape(entry.label or '')}</b> {entry.score:.1%}<br>"
            f'<a href="{folder}">{html.escape(entry.path)}</a></figcaption></figure>'
        )
    model = html.escape(str(context.model.get("reference") or context.model.get("name") or ""))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vit attention: {len(figures)} images</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1em; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: .5em; }}
img {{ width: 100%; height: auto; }}
figcaption {{ font-size: .85em; overflow-wrap: anywhere; }}
</style></head><body>
<h1>vit attention</h1>
<p>model <code>{model}</code> · {len(figures)} images written, {len(failures)} failed</p>
<main>
{chr(10).join(figures)}
</main>
{"<h2>Failed</h2><ul>" + chr(10).join(failures) + "</ul>" if failures else ""}
</body></html>
"""
    path = out_dir / "index.html"
    write_atomic(path, page.encode("utf-8"))
    return path
