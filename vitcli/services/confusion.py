"""`vit eval --confusion-png`: the confusion matrix as a figure readable at 100% zoom.

Cells grow or shrink with the number of classes (64 px for a handful, 22 px down to a few
pixels for hundreds), each holds its count where there is room, rows and columns are named
(long names lose their middle), and a colour bar says what the colour is: the share of the
true class's images (rows sum to 1). Drawn with the Canvas of the inspect figures.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import OptionError
from ..fileio import atomic_write_bytes
from .attention.figure import middle_ellipsis
from .inspect.figures import INK, MUTED, WHITE, Canvas, colourbar, font

# `result` below is an evaluate.EvalResult, typed Any so that evaluate (which draws with this
# module) and this module do not import each other.
EvalResult = Any
COLORMAP = "viridis"  # as scikit-learn's ConfusionMatrixDisplay
MAX_LABEL_W = 240  # pixels; a longer class name loses its middle


def cell_size(classes: int) -> int:
    """Pixels per cell: 64 for a few classes, 560 px of matrix down to 22 px cells, then a
    matrix of about 1600 px whatever the count (2 px cells at least)."""
    if classes * 22 <= 1600:
        return min(64, max(22, 560 // max(classes, 1)))
    return max(2, 1600 // classes)


def _shares(confusion: list[list[int]]) -> np.ndarray:
    counts = np.asarray(confusion, dtype=np.float64).reshape(len(confusion), -1)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _label_size(cell: int) -> int:
    return int(max(9, min(14, cell - 4)))


def _every(cell: int) -> int:
    """Label every k-th row and column: cells under 11 px are too small for each name."""
    return max(1, math.ceil(11 / cell))


def confusion_figure(result: EvalResult) -> Image.Image:
    rows = [c.label for c in result.classes]
    columns = list(result.confusion_labels)
    cell = cell_size(max(len(rows), len(columns)))
    size, every = _label_size(cell), _every(cell)
    measure = Canvas(10, 10)

    def name(text: str) -> str:
        return middle_ellipsis(text, font(size * measure.scale), MAX_LABEL_W * measure.scale)

    row_w = max(measure.text_width(name(label), size) for label in rows)
    column_h = max(measure.text_width(name(label), size) for label in columns)
    matrix_w, matrix_h = cell * len(columns), cell * len(rows)
    left = 20 + 26 + row_w + 10  # the axis title, the names, a gap
    width = int(max(left + matrix_w + 24 + 14 + 70, 620))
    title = "Confusion matrix"
    subtitle = [
        f"{result.model} on {result.data}: top-1 {result.top1:.1%}, top-5 {result.top5:.1%} "
        f"of {result.images} images",
        "rows: true class, columns: predicted class; colour: the share of the true class's "
        "images (each row sums to 1)",
    ]
    top = Canvas(width, 400).header(title, subtitle) + 26 + column_h + 8
    bar_h = max(min(matrix_h, 320), 120)
    height = int(top + max(matrix_h, bar_h) + 24)
    canvas = Canvas(width, height)
    canvas.header(title, subtitle)
    shares = _shares(result.confusion)
    colours = _colours(shares)
    canvas.paste(colours, (left, top), (matrix_w, matrix_h))
    digits = max(len(str(count)) for row in result.confusion for count in row)
    count_size = int(min(15, cell * 0.42))
    fits = cell >= 22 and canvas.text_width("8" * digits, count_size) <= cell - 4
    for r, row in enumerate(result.confusion):
        y = top + r * cell
        if r % every == 0:
            canvas.text((left - 8, y + cell / 2), name(rows[r]), size=size, anchor="rm")
        for c, count in enumerate(row if fits else ()):
            dark = shares[r, c] < 0.5  # viridis: dark below the middle
            fill = WHITE if dark else INK
            if count == 0:
                if len(columns) > 12:  # many classes: empty cells stay empty
                    continue
                fill = (120, 120, 150)
            canvas.text(
                (left + c * cell + cell / 2, y + cell / 2),
                str(count),
                size=count_size,
                fill=fill,
                anchor="mm",
            )
    for c, label in enumerate(columns):
        if c % every == 0:
            _column_name(canvas, (left + c * cell + cell / 2, top - 6), name(label), size)
    if cell >= 12:  # a hairline between cells
        for k in range(1, len(columns)):
            canvas.line([(left + k * cell, top), (left + k * cell, top + matrix_h)], fill=WHITE)
        for k in range(1, len(rows)):
            canvas.line([(left, top + k * cell), (left + matrix_w, top + k * cell)], fill=WHITE)
    canvas.rectangle((left, top, left + matrix_w, top + matrix_h), outline=MUTED)
    canvas.text((left + matrix_w / 2, top - column_h - 30), "Predicted class", size=14, anchor="ma")
    canvas.vertical_text((20 + 8, top + matrix_h / 2), "True class", size=14)
    bar_x = left + matrix_w + 24
    colourbar(canvas, (bar_x, top, bar_x + 14, top + bar_h), COLORMAP, 0.0, 1.0, "share of row")
    return canvas.finish()


def _colours(shares: np.ndarray) -> np.ndarray:
    from .attention import colormaps

    return colormaps.apply(shares, COLORMAP)


def _column_name(canvas: Canvas, bottom_centre: tuple[float, float], text: str, size: int):
    """A column's name written upwards, its end just above the matrix."""
    face = font(size * canvas.scale)
    left, top, right, bottom = face.getbbox(text)
    strip = Image.new("RGBA", (right - left + 4, bottom - top + 4), (255, 255, 255, 0))
    ImageDraw.Draw(strip).text((2 - left, 2 - top), text, font=face, fill=INK)
    strip = strip.rotate(90, expand=True)
    x, y = bottom_centre[0] * canvas.scale, bottom_centre[1] * canvas.scale
    canvas.image.paste(strip, (int(x - strip.width / 2), int(y - strip.height)), strip)


def confusion_png(result: EvalResult, path: str | Path) -> Path:
    """Write the confusion matrix figure of `result` to `path` (a .png name)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OptionError(f"--confusion-png {path}: use a .png file name")
    buffer = io.BytesIO()
    confusion_figure(result).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
