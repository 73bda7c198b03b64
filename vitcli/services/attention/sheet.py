"""The contact sheet of one image: a header, the original and each method's map on the first
row, then per chosen layer the head mean and every head (wrapping after MAX_COLUMNS tiles).

Text is drawn with Pillow's bundled FreeType font; what every sheet of a run shares (titles,
option lines, colour bar) is drawn once into a cached template.
"""

from __future__ import annotations

import threading
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...data.images import display_size
from . import colormaps
from .names import readable
from .options import AttentionOptions, Style
from .paint import overlay_tiles

if TYPE_CHECKING:
    from .batches import ImageAttention

MAX_COLUMNS = 7  # tiles per sheet row


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


def render_sheet(
    result: ImageAttention, image: Image.Image, options: AttentionOptions
) -> Image.Image:
    """original | one tile per method on the first row, then per chosen layer: head mean |
    head 0 ... nh-1."""
    size = display_size(result.geometry.original_size, options.tile)
    if image.size != size:  # once, for the original and the overlays
        image = image.resize(size, Image.Resampling.BILINEAR)
    tiles = overlay_tiles(result, image, options, size)
    original = np.array(image)
    box_left, box_top, box_right, box_bottom = result.geometry.box
    original_w, original_h = result.geometry.original_size
    full = box_left <= 0 and box_top <= 0 and box_right >= original_w and box_bottom >= original_h
    per_layer = result.heads.shape[1] + 1  # head mean + every head
    columns = min(per_layer, MAX_COLUMNS)  # many heads (B: 12, L: 16) wrap onto more rows
    rows: list[list[tuple[str, np.ndarray]]] = [[("original", original)]]
    methods = len(result.methods)
    rows[0].extend((title, pixels) for _, title, pixels in tiles[:methods])
    rest = tiles[methods:]
    for layer_start in range(0, len(rest), per_layer):  # each layer starts a new row
        layer_tiles = rest[layer_start : layer_start + per_layer]
        for start in range(0, len(layer_tiles), columns):
            rows.append(
                [(title, pixels) for _, title, pixels in layer_tiles[start : start + columns]]
            )

    titles = tuple(tuple(title for title, _ in row) for row in rows)
    heatmap = options.style == Style.heatmap
    with _TEXT_LOCK:  # one FreeType face is shared by the rendering threads
        template, layout = _sheet_template(
            size,
            max(columns, len(rows[0])),
            titles,
            header_parts(result, options),
            options.colormap.value if heatmap else "",
        )
        sheet = template.copy()
        draw = ImageDraw.Draw(sheet)
        text_w, pad = layout["text_w"], _PAD
        title, subtitle = title_lines(result)
        draw.text((pad, 8), _fit(title, font(20), text_w), fill=(20, 20, 20), font=font(20))
        draw.text((pad, 38), _fit(subtitle, font(13), text_w), fill=(70, 70, 70), font=font(13))
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


def title_lines(result: ImageAttention) -> tuple[str, str]:
    """The sheet's two title lines: the predicted label by name and its score, then the file
    and what the maps show (attention and rollout are the same whatever the class)."""
    _, label, score = result.top[0]
    shown = " and ".join(["attention", *result.methods])
    return (
        f"{readable(label)}  {score:.1%}",
        f"{readable(Path(result.path).name)}  ·  predicted label (top-1)  ·  "
        f"{shown}: the same for every class",
    )


def header_parts(result: ImageAttention, options: AttentionOptions) -> tuple[str, ...]:
    """The options that shape what the sheet shows, one short phrase each."""
    parts = []
    if "rollout" in result.methods:
        parts.append(
            f"rollout: {options.head_fusion.value} over heads, discard {options.discard_ratio:g}"
        )
    heatmap = options.style == Style.heatmap
    parts.append(options.style.value + (f" {options.colormap.value}" if heatmap else ""))
    parts.append(f"{options.interpolation.value}, {options.scale.value} scale")
    parts.append(f"grid {result.grid_size[0]}x{result.grid_size[1]}")
    if result.query != "cls":
        parts.append("no CLS token: mean over queries")
    if options.threshold is not None:
        parts.append(f"outline: top patches with {options.threshold:g} of each head's mass")
    return tuple(parts)


def sheet_size(
    options: AttentionOptions, num_heads: int, num_layers: int, methods: int
) -> tuple[int, int]:
    """(width, height) of the largest sheet these options draw (a tall picture's tiles are
    `tile` high), to refuse absurd ones before any work."""
    per_layer = num_heads + 1
    columns = min(per_layer, MAX_COLUMNS)
    cell_w = max(options.tile, 150)
    rows = 1 + num_layers * -(-per_layer // columns)
    width = _PAD + max(columns, 2, 1 + methods) * (cell_w + _PAD)
    return width, 200 + rows * (_TITLE_H + options.tile + _PAD) + _PAD


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
