"""Drawing the three panels of Fig. 7 with Pillow and numpy (matplotlib is not a dependency).

Everything is drawn at twice the output size and reduced with a Lanczos filter at the end,
which antialiases lines, dots and text in one step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The one import of the colour tables for inspect and the explorer (it moves with the
# attention package; change it here only).
from ..attention import colormaps

SUPERSAMPLE = 2
INK = (30, 30, 30)
MUTED = (100, 100, 100)
FAINT = (225, 225, 225)
WHITE = (255, 255, 255)
# Distinct colours for up to 16 heads (Tableau-like, chosen by hand); more heads sample plasma.
HEAD_COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (0, 0, 128), (128, 0, 0), (0, 128, 128), (255, 200, 0), (100, 200, 255), (0, 0, 0),
]  # fmt: skip


def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB table of a colormap (viridis, inferno, ...)."""
    return colormaps.lut(name)


def colormap_names() -> tuple[str, ...]:
    return tuple(colormaps.COLORMAPS)


@cache
def font(size: int):
    """Pillow's bundled FreeType face at `size` pixels (Pillow >= 10.1), bitmap otherwise."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def head_colour(head: int, num_heads: int) -> tuple[int, int, int]:
    if num_heads <= len(HEAD_COLOURS):
        return HEAD_COLOURS[head]
    r, g, b = colormaps.lut("plasma")[int(round(head / max(num_heads - 1, 1) * 220))]
    return int(r), int(g), int(b)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of 10)."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-9 else "0"


class Canvas:
    """A white page drawn at SUPERSAMPLE x; coordinates given at the output scale."""

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)
        self.scale = SUPERSAMPLE
        self.image = Image.new("RGB", (width * self.scale, height * self.scale), WHITE)
        self.draw = ImageDraw.Draw(self.image)

    def _p(self, x: float, y: float) -> tuple[float, float]:
        return (x * self.scale, y * self.scale)

    def text(self, xy, text: str, size: int = 14, fill=INK, anchor: str = "la") -> None:
        self.draw.text(self._p(*xy), text, font=font(size * self.scale), fill=fill, anchor=anchor)

    def text_width(self, text: str, size: int = 14) -> float:
        return font(size * self.scale).getlength(text) / self.scale

    def vertical_text(self, centre, text: str, size: int = 14, fill=INK) -> None:
        """Text rotated 90 degrees counter-clockwise, centred on `centre` (a y-axis label)."""
        face = font(size * self.scale)
        left, top, right, bottom = face.getbbox(text)
        strip = Image.new("RGBA", (right - left + 4, bottom - top + 4), (255, 255, 255, 0))
        ImageDraw.Draw(strip).text((2 - left, 2 - top), text, font=face, fill=fill)
        strip = strip.rotate(90, expand=True)
        x, y = self._p(*centre)
        self.image.paste(strip, (int(x - strip.width / 2), int(y - strip.height / 2)), strip)

    def line(self, points, fill=INK, width: float = 1.0) -> None:
        self.draw.line(
            [self._p(*p) for p in points], fill=fill, width=max(1, round(width * self.scale))
        )

    def dashed(self, start, end, fill=MUTED, width: float = 1.0, dash: float = 6.0) -> None:
        (x0, y0), (x1, y1) = start, end
        length = math.hypot(x1 - x0, y1 - y0)
        steps = max(1, int(length / dash))
        for i in range(0, steps, 2):
            a, b = i / steps, min((i + 1) / steps, 1.0)
            self.line(
                [
                    (x0 + (x1 - x0) * a, y0 + (y1 - y0) * a),
                    (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b),
                ],
                fill=fill,
                width=width,
            )

    def rectangle(self, box, outline=None, fill=None, width: float = 1.0) -> None:
        x0, y0, x1, y1 = box
        self.draw.rectangle(
            [*self._p(x0, y0), *self._p(x1, y1)],
            outline=outline,
            fill=fill,
            width=max(1, round(width * self.scale)),
        )

    def dot(self, centre, radius: float, fill, outline=WHITE) -> None:
        x, y = self._p(*centre)
        r = radius * self.scale
        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline, width=1)

    def paste(self, pixels: np.ndarray, xy, size: tuple[int, int]) -> None:
        """An (h, w, 3) uint8 array shown at `size` (output pixels), nearest-neighbour so that
        every cell stays a sharp block."""
        tile = Image.fromarray(pixels).resize(
            (size[0] * self.scale, size[1] * self.scale), Image.Resampling.NEAREST
        )
        x, y = self._p(*xy)
        self.image.paste(tile, (int(round(x)), int(round(y))))

    def header(self, title: str, subtitle: Sequence[str] = (), width: float | None = None) -> float:
        """Title and wrapped subtitle lines at the top; returns the y below them."""
        self.text((20, 16), title, size=22)
        y = 48.0
        limit = (width or self.size[0]) - 40
        for line in subtitle:
            for part in wrap(line, lambda t: self.text_width(t, 13), limit):
                self.text((20, y), part, size=13, fill=MUTED)
                y += 18
        return y + 6

    def finish(self) -> Image.Image:
        return self.image.resize(self.size, Image.Resampling.LANCZOS)


def wrap(text: str, measure, width: float) -> list[str]:
    words, lines = text.split(" "), [""]
    for word in words:
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and measure(trial) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines


def colourbar(
    canvas: Canvas,
    box: tuple[float, float, float, float],
    colormap: str,
    low: float,
    high: float,
    label: str,
) -> None:
    """A vertical colour bar in `box` (high at the top), ticks on the right, label beside."""
    x0, y0, x1, y1 = box
    height = int(y1 - y0)
    ramp = colormaps.apply(np.linspace(1, 0, height)[:, None].repeat(int(x1 - x0), 1), colormap)
    canvas.paste(ramp, (x0, y0), (int(x1 - x0), height))
    canvas.rectangle(box, outline=MUTED)
    for value in nice_ticks(low, high, 5):
        y = y1 - (value - low) / (high - low) * (y1 - y0)
        canvas.line([(x1, y), (x1 + 4, y)], fill=MUTED)
        canvas.text((x1 + 7, y), tick_label(value), size=12, fill=INK, anchor="lm")
    canvas.vertical_text((x1 + 52, (y0 + y1) / 2), label, size=13)


# -- Fig. 7 left ---------------------------------------------------------------------------
def _component_rgb(component: np.ndarray) -> np.ndarray:
    """(C, P, P) -> (P, P, 3) uint8, stretched to its own min..max (as in the paper)."""
    channels = component.shape[0]
    if channels == 3:
        pixels = component.transpose(1, 2, 0)
    else:  # one channel (greyscale models), or more than three: the first channel in grey
        pixels = np.repeat(component[0][..., None], 3, axis=2)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.full_like(pixels, 0.5)
    return (scaled * 255 + 0.5).astype(np.uint8)


def components_figure(
    components: np.ndarray, ratio: np.ndarray, subtitle: Sequence[str], columns: int = 7
) -> Image.Image:
    """The first principal components as a grid of RGB tiles, each with its share of the
    variance."""
    count, _, patch_h, patch_w = components.shape
    rows = math.ceil(count / columns)
    tile = max(64, patch_w * max(1, 72 // patch_w))  # whole multiples of P stay sharp
    gap_x, gap_y = 14, 30
    width = max(40 + columns * tile + (columns - 1) * gap_x, 560)
    canvas = Canvas(width, 10)  # height set below, once the header is measured
    measure = Canvas(width, 400)
    top = measure.header("Patch-embedding filters: principal components", subtitle)
    height = int(top + rows * (tile + gap_y) + 16)
    canvas = Canvas(width, height)
    canvas.header("Patch-embedding filters: principal components", subtitle)
    left = (width - (columns * tile + (columns - 1) * gap_x)) / 2
    for index in range(count):
        row, column = divmod(index, columns)
        x = left + column * (tile + gap_x)
        y = top + row * (tile + gap_y)
        canvas.paste(_component_rgb(components[index]), (x, y), (tile, tile * patch_h // patch_w))
        canvas.rectangle((x, y, x + tile, y + tile * patch_h // patch_w), outline=FAINT)
        canvas.text(
            (x + tile / 2, y + tile + 4),
            f"PC{index + 1}  {ratio[index]:.1%}",
            size=12,
            fill=MUTED,
            anchor="ma",
        )
    return canvas.finish()


# -- Fig. 7 centre -------------------------------------------------------------------------
def similarity_range(similarity: np.ndarray) -> tuple[float, float]:
    """The colour range: -1..1 as in the paper, unless every similarity is clearly positive
    (fixed sin/cos tables sit between ~0.5 and 1), where -1..1 would hide all structure."""
    low = float(similarity.min())
    return (-1.0, 1.0) if low < 0.05 else (math.floor(low * 10) / 10, 1.0)


def similarity_figure(
    similarity: np.ndarray, subtitle: Sequence[str], colormap: str = "viridis"
) -> Image.Image:
    """(Hp, Wp, Hp, Wp) cosine similarities as Hp x Wp small grids: the small grid at row i,
    column j is the similarity of patch (i, j) with every patch."""
    low, high = similarity_range(similarity)
    grid_h, grid_w = similarity.shape[:2]
    gap = 3 if max(grid_h, grid_w) <= 16 else 2 if max(grid_h, grid_w) <= 32 else 1
    budget_w, budget_h = 900, 760  # pixels for the mosaic; cells are whole pixels, square
    cell = max(
        1,
        min(
            24,
            (budget_w - (grid_w - 1) * gap) // (grid_w * grid_w),
            (budget_h - (grid_h - 1) * gap) // (grid_h * grid_h),
        ),
    )
    small_w, small_h = grid_w * cell, grid_h * cell
    mosaic_w = grid_w * small_w + (grid_w - 1) * gap
    mosaic_h = grid_h * small_h + (grid_h - 1) * gap
    margin_left, margin_right = 70, 110
    width = max(margin_left + mosaic_w + margin_right, 620)
    title = "Position embedding similarity"
    top = Canvas(width, 400).header(title, subtitle) + 28
    height = int(top + mosaic_h + 60)
    canvas = Canvas(width, height)
    canvas.header(title, subtitle)
    left = margin_left + (width - margin_left - margin_right - mosaic_w) / 2
    colours = colormaps.apply(
        np.clip((similarity - low) / (high - low), 0, 1), colormap
    )  # Hp,Wp,Hp,Wp,3
    label_every = max(1, math.ceil(max(grid_h, grid_w) / 14))
    for i in range(grid_h):
        y = top + i * (small_h + gap)
        if i % label_every == 0 or i == grid_h - 1:
            canvas.text((left - 8, y + small_h / 2), str(i), size=12, anchor="rm")
        for j in range(grid_w):
            x = left + j * (small_w + gap)
            canvas.paste(colours[i, j], (x, y), (small_w, small_h))
    for j in range(grid_w):
        if j % label_every == 0 or j == grid_w - 1:
            x = left + j * (small_w + gap)
            canvas.text((x + small_w / 2, top + mosaic_h + 6), str(j), size=12, anchor="ma")
    canvas.text(
        (left + mosaic_w / 2, top + mosaic_h + 26), "Input patch column", size=14, anchor="ma"
    )
    canvas.vertical_text((left - 44, top + mosaic_h / 2), "Input patch row", size=14)
    bar_x = left + mosaic_w + 22
    bar_h = min(mosaic_h, 320)
    bar_y = top + (mosaic_h - bar_h) / 2
    colourbar(
        canvas, (bar_x, bar_y, bar_x + 14, bar_y + bar_h), colormap, low, high, "Cosine similarity"
    )
    return canvas.finish()


# -- Fig. 7 right --------------------------------------------------------------------------
def distance_figure(
    distances: np.ndarray,
    subtitle: Sequence[str],
    uniform: float | None = None,
    image_size: tuple[int, int] | None = None,
) -> Image.Image:
    """(L, nh) mean attention distances as dots per head against depth (layers from 0)."""
    depth, num_heads = distances.shape
    legend_columns = 1 if num_heads <= 16 else 2
    legend_w = 90 * legend_columns
    width = 760 + legend_w
    title = "Mean attention distance per head"
    top = Canvas(width, 400).header(title, subtitle) + 12
    plot_h = 380
    height = int(top + plot_h + 70)
    canvas = Canvas(width, height)
    canvas.header(title, subtitle)
    x0, x1 = 80.0, float(width - legend_w - 30)
    y0, y1 = top + 10, top + plot_h  # y1 is the bottom of the axes
    high = max(float(np.nanmax(distances)) if distances.size else 0.0, uniform or 0.0)
    if image_size is not None:
        # The largest possible distance is the diagonal; stop the axis a little above the data.
        high = min(high * 1.1, math.hypot(*image_size))
    high = max(high * 1.05, 1.0)
    y_ticks = nice_ticks(0.0, high, 6)
    if len(y_ticks) > 1 and y_ticks[-1] < high:  # end the axis on a tick
        y_ticks.append(round(2 * y_ticks[-1] - y_ticks[-2], 10))
    high = y_ticks[-1]

    def px(layer: float) -> float:  # layers counted from 0, as `vit attention --layer`
        return x0 + (layer + 0.5) / depth * (x1 - x0)

    def py(value: float) -> float:
        return y1 - value / high * (y1 - y0)

    for value in y_ticks:
        canvas.line([(x0, py(value)), (x1, py(value))], fill=(238, 238, 238))
        canvas.line([(x0 - 4, py(value)), (x0, py(value))], fill=MUTED)
        canvas.text((x0 - 8, py(value)), tick_label(value), size=12, anchor="rm")
    step = max(1, math.ceil(depth / 16))
    for layer in range(depth):
        if layer % step == 0 or layer == depth - 1:
            canvas.line([(px(layer), y1), (px(layer), y1 + 4)], fill=MUTED)
            canvas.text((px(layer), y1 + 7), str(layer), size=12, anchor="ma")
    canvas.rectangle((x0, y0, x1, y1), outline=MUTED)
    if uniform is not None:
        canvas.dashed((x0, py(uniform)), (x1, py(uniform)), fill=(150, 150, 150), width=1.2)
    # Heads side by side within a layer, a little apart, so that equal values stay visible.
    spread = min(0.5, 0.04 * num_heads) * (x1 - x0) / depth
    for layer in range(depth):
        for head in range(num_heads):
            offset = (head / max(num_heads - 1, 1) - 0.5) * spread if num_heads > 1 else 0.0
            value = float(distances[layer, head])
            if math.isfinite(value):
                canvas.dot((px(layer) + offset, py(value)), 4.0, head_colour(head, num_heads))
    canvas.text(
        (x0 + (x1 - x0) / 2, y1 + 28), "Network depth (layer, from 0)", size=14, anchor="ma"
    )
    canvas.vertical_text((x0 - 52, (y0 + y1) / 2), "Mean attention distance (pixels)", size=14)
    legend_x = x1 + 24
    canvas.text((legend_x, y0), "heads", size=13, fill=MUTED)
    rows = math.ceil(num_heads / legend_columns)
    for head in range(num_heads):
        column, row = divmod(head, rows)
        lx, ly = legend_x + column * 90, y0 + 24 + row * 20
        canvas.dot((lx + 6, ly + 7), 4.5, head_colour(head, num_heads))
        canvas.text((lx + 16, ly + 7), f"head {head}", size=12, anchor="lm")
    if uniform is not None:
        ly = y0 + 24 + rows * 20 + 10
        canvas.dashed((legend_x, ly + 7), (legend_x + 14, ly + 7), fill=(150, 150, 150), dash=3)
        canvas.text((legend_x + 18, ly + 7), "uniform", size=12, anchor="lm")
        canvas.text((legend_x + 18, ly + 22), "attention", size=12, anchor="lm")
    return canvas.finish()
