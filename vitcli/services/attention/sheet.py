"""The contact sheet of one image: a header, then the original, each method's maps (one per
target for a class-specific method) and per chosen layer the head mean and every head, laid
out in bands that keep rows full where the tile counts allow (`layout`). Every tile says its
map's real range under its title (`paint.range_note`).

Tiles keep the image's shape (`figure.tile_size`), titles wrap instead of being cut, and the
header's words come from `heading`. What every sheet of a run shares (tile titles, option
lines, colour key) is drawn once into a cached template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from .figure import (
    MUTED,
    TEXT_LOCK,
    WARN,
    fit,
    font,
    key_labels,
    key_pixels,
    middle_ellipsis,
    sheet_original,
    tile_size,
    wrap_parts,
    wrapped,
)
from .heading import header_parts, header_texts
from .meta import mass_note
from .options import AttentionOptions, Scale
from .paint import Tile, overlay_tiles

if TYPE_CHECKING:
    from .batches import ImageAttention

MAX_COLUMNS = 7  # tiles per sheet row


def layout(
    bands: Sequence[int], max_columns: int = MAX_COLUMNS
) -> tuple[int, list[tuple[int, int]]]:
    """(columns, (row, column) of every tile) for bands of tiles that belong together.

    A band that fits what is left of the current row stays on it; one that does not starts
    a new row; one wider than the sheet flows on from where the last one ended. Of every
    width from MIN_COLUMNS to `max_columns` the one leaving the fewest empty cells wins (row
    breaks inside a band count two; the widest wins a tie), so rows are full where the tiles
    allow it: original + rollout + a 4-head layer make one row of 7, not a row of 2 above a
    row of 5; 12 heads (13 tiles) with 2 before them make 3 full rows of 5.
    """
    total = sum(bands)
    if total == 0:
        return 1, []
    best: tuple[int, int, list[tuple[int, int]]] | None = None
    for columns in range(min(max_columns, total), min(MIN_COLUMNS, total) - 1, -1):
        places = _place(bands, columns)
        empty = (places[-1][0] + 1) * columns - total
        # A row break inside a band (a layer's heads on two rows) costs two empty cells: a
        # narrow sheet would otherwise win by wrapping every layer.
        start, breaks = 0, 0
        for size in bands:
            breaks += places[start + size - 1][0] - places[start][0]
            start += size
        cost = empty + 2 * breaks
        if best is None or cost < best[0]:
            best = (cost, columns, places)
    assert best is not None
    return best[1], best[2]


def _place(bands: Sequence[int], columns: int) -> list[tuple[int, int]]:
    places: list[tuple[int, int]] = []
    row, column = 0, 0
    for size in bands:
        if column and size <= columns and column + size > columns:
            row, column = row + 1, 0
        for _ in range(size):
            if column == columns:
                row, column = row + 1, 0
            places.append((row, column))
            column += 1
    return places


def all_tiles(
    result: ImageAttention, image: Image.Image, options: AttentionOptions, size: tuple[int, int]
) -> list[Tile]:
    """Every overlay of one image in sheet order: the methods' maps, the MAP probe's heads
    (SigLIP's class map), then per chosen layer the head mean and heads of each query row
    (CLS, then dist for DeiT distilled). All per-head maps share one colour range (they are
    the same quantity: attention renormalised over the patches), and each head tile's note
    gets a second line with its raw mass on the prefix tokens."""
    if result.heads is None or result.head_mean is None:
        return overlay_tiles(result, image, options, size)
    # (query, layer or None for the probe, {heads, head_mean, masks, prefix_mass})
    positions: list[tuple[str, int | None, dict]] = []
    own = {
        "heads": result.heads,
        "head_mean": result.head_mean,
        "masks": result.masks,
        "prefix_mass": result.prefix_mass,
    }
    if "probe" in result.queries:
        positions.append(("probe", None, {k: v[0] for k, v in result.queries["probe"].items()}))
    for position, chosen in enumerate(result.layers):
        positions.append(
            (
                result.head_query,
                chosen,
                {k: v[position] for k, v in own.items() if v is not None},
            )
        )
        for name, arrays in result.queries.items():
            if name != "probe":
                positions.append((name, chosen, {k: v[position] for k, v in arrays.items()}))
    with_masks = all("masks" in arrays for _, _, arrays in positions)
    combined = replace(
        result,
        heads=np.stack([arrays["heads"] for _, _, arrays in positions]),
        head_mean=np.stack([arrays["head_mean"] for _, _, arrays in positions]),
        masks=np.stack([arrays["masks"] for _, _, arrays in positions]) if with_masks else None,
        layers=list(range(len(positions))),
    )
    tiles = overlay_tiles(combined, image, options, size)
    methods, rest = tiles[: len(result.methods)], tiles[len(result.methods) :]
    num_heads = result.heads.shape[1]
    named = list(methods)
    plain = len(positions) == len(result.layers)  # one query row: the names as always
    for number, (query, layer, arrays) in enumerate(positions):
        if query == "probe":
            stem, title, band = "probe", "probe", "probe"
        elif plain or query == "mean":  # the mean over queries: the header says so
            stem, title, band = f"layer{layer:02d}", f"layer {layer}", f"layer{layer:02d}"
        else:
            label = "CLS" if query == "cls" else query
            stem, title = f"{query}_layer{layer:02d}", f"{label} · layer {layer}"
            band = stem
        mass = arrays.get("prefix_mass")
        group = rest[number * (num_heads + 1) : (number + 1) * (num_heads + 1)]
        for head, tile in enumerate(group):
            which = "head mean" if head == 0 else f"head {head - 1}"
            note = tile.note
            if mass is not None and len(result.prefix_names):
                values = mass.mean(axis=0) if head == 0 else mass[head - 1]
                note += "\n" + mass_note(result.prefix_names, values)
            named.append(
                replace(
                    tile,
                    stem=f"{stem}_mean" if head == 0 else f"{stem}_head{head - 1:02d}",
                    title=f"{title} · {which}",
                    note=note,
                    band=band,
                )
            )
    return named


def render_sheet(
    result: ImageAttention, image: Image.Image, options: AttentionOptions, model: str = ""
) -> Image.Image:
    """`model`: a phrase naming the model, first of the option lines. The header, then the
    original, each method's maps (a class-specific method: one per
    target) and per chosen layer its head mean and heads, in bands laid out by `layout`."""
    size = tile_size(result.geometry.original_size, options.tile)
    image = sheet_original(image, result.geometry.original_size, options.tile)
    tiles = all_tiles(result, image, options, size)
    original = np.array(image)
    box_left, box_top, box_right, box_bottom = result.geometry.box
    original_w, original_h = result.geometry.original_size
    full = box_left <= 0 and box_top <= 0 and box_right >= original_w and box_bottom >= original_h
    note = "the model's input outlined" if not full else "what the model saw"
    cells = [("original", note, original), *((t.title, t.note, t.pixels) for t in tiles)]
    bands = [1] + [len(list(group)) for _, group in groupby(tiles, key=lambda t: t.band)]
    cell_w = max(size[0], MIN_CELL_W)
    columns, places = layout(bands, max_columns(cell_w, options.tile))
    rows = places[-1][0] + 1
    note_lines = max(len(note.split("\n")) for _, note, _ in cells)
    with TEXT_LOCK:
        titles = tuple(
            (place, wrapped(title, 14, cell_w - 4)) for place, (title, _, _) in zip(places, cells)
        )
        title_rows = max(len(lines) for _, lines in titles)
        sheet_w = sheet_width(columns, cell_w)
        text_w = sheet_w - 2 * _PAD - _KEY_W - _PAD
        heading, subheading = header_texts(result)
        heading_lines = wrap_parts(heading, font(20), text_w, separator="   ·   ")
        name, *rest = subheading
        subheading_lines = wrap_parts(
            [middle_ellipsis(name, font(13), text_w), *rest], font(13), text_w
        )
        template, geometry = _sheet_template(
            size,
            columns,
            rows,
            titles,
            ((model,) if model else ()) + header_parts(result, options),
            _key(options),
            (len(heading_lines), len(subheading_lines)),
            title_rows,
            note_lines,
        )
        sheet = template.copy()
        draw = ImageDraw.Draw(sheet)
        for number, line in enumerate(heading_lines):
            draw.text((_PAD, 8 + 26 * number), line, fill=(20, 20, 20), font=font(20))
        for number, line in enumerate(subheading_lines):
            y = geometry["subheading_y"] + 18 * number
            draw.text((_PAD, y), line, fill=(70, 70, 70), font=font(13))
        for (row, column), (_, tile_note, _) in zip(places, cells):
            x, y = geometry["cell"](row, column)
            for number, line in enumerate(tile_note.split("\n")):
                flat = line.endswith("(flat)")
                draw.text(
                    (x + cell_w / 2, y + geometry["note_y"] + number * _NOTE_H),
                    fit(line, font(12), cell_w),
                    fill=WARN if flat else MUTED,
                    font=font(12),
                    anchor="ma",
                )
    for (row, column), (tile_title, _, pixels) in zip(places, cells):
        x, y = geometry["cell"](row, column)
        tile_x, tile_y = x + (cell_w - size[0]) // 2, y + geometry["title_h"]
        sheet.paste(Image.fromarray(pixels), (tile_x, tile_y))
        if tile_title == "original" and not full:
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


def max_columns(cell_w: int, tile: int) -> int:
    """Columns for tiles `cell_w` wide: as many as fit the width of MAX_COLUMNS square tiles
    and a quarter more (a 3:2 photo keeps 7 columns, a 4:1 panorama's wide tiles make 4),
    3 at least."""
    budget = MAX_COLUMNS * (max(tile, MIN_CELL_W) + _PAD) * 5 // 4
    return max(MIN_COLUMNS, min(MAX_COLUMNS, budget // (cell_w + _PAD)))


def sheet_width(columns: int, cell_w: int) -> int:
    return _PAD + max(columns, 2) * (cell_w + _PAD)


def sheet_size(
    options: AttentionOptions, num_heads: int, num_layers: int, maps: int
) -> tuple[int, int]:
    """(width, height) of the sheet these options draw for a square image, to refuse absurd
    ones before any work (other aspects keep the tiles' area). `maps`: single-map tiles."""
    bands = [1, maps] + ([num_heads + 1] * num_layers if options.heads else [])
    columns, places = layout([band for band in bands if band])
    rows = places[-1][0] + 1
    width = sheet_width(columns, max(options.tile, MIN_CELL_W))
    # Two title lines and the prefix-mass line counted always: an upper bound.
    title_h = 2 + 2 * _TITLE_LINE_H + 2 + 2 * _NOTE_H + 4
    return width, 200 + rows * (title_h + options.tile + _PAD) + _PAD


_PAD = 10
_TITLE_LINE_H, _NOTE_H = 18, 15  # a line of a tile's title; of its note (range, prefix mass)
_KEY_W = 170  # the colour key in the header's right corner
MIN_CELL_W = 150  # a narrow (tall) image's tiles sit in cells this wide, for their titles
MIN_COLUMNS = 3


def _key(options: AttentionOptions) -> tuple[str, str, float, bool]:
    return (
        options.style.value,
        options.colormap.value,
        options.overlay_alpha,
        options.scale == Scale.per_map,
    )


@lru_cache(maxsize=8)
def _sheet_template(
    size: tuple[int, int],
    columns: int,
    rows: int,
    titles: tuple,
    parts: tuple,
    key: tuple[str, str, float, bool],
    header_lines: tuple[int, int] = (1, 1),
    title_rows: int = 1,
    note_lines: int = 1,
):
    """The parts of a sheet every image of a run shares (tile titles, option lines, colour
    key), drawn once: text rendering is a good share of the time of a sheet otherwise.
    `header_lines`: lines of the heading and the subheading drawn per image; `title_rows`,
    `note_lines`: the most lines of any tile's title and note."""
    pad = _PAD
    small_font = font(13)
    cell_w = max(size[0], MIN_CELL_W)
    note_y = 2 + _TITLE_LINE_H * title_rows
    title_h = note_y + 2 + _NOTE_H * note_lines + 4
    cell_h = title_h + size[1]
    sheet_w = sheet_width(columns, cell_w)
    subheading_y = 12 + 26 * header_lines[0]
    options_y = subheading_y + 18 * header_lines[1] + 2
    option_lines = wrap_parts(list(parts), small_font, sheet_w - 2 * pad)  # full width
    header_h = options_y + 18 * len(option_lines) + 8
    sheet = Image.new("RGB", (sheet_w, header_h + rows * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for number, line in enumerate(option_lines):
        draw.text((pad, options_y + 18 * number), line, fill=MUTED, font=small_font)
    style, colormap, alpha, per_map = key
    bar = key_pixels(style, colormap, alpha, _KEY_W - 40, 12)
    bar_x = sheet_w - pad - _KEY_W + 20
    sheet.paste(Image.fromarray(bar), (bar_x, 14))
    draw.rectangle([bar_x - 1, 13, bar_x + bar.shape[1], 26], outline=(200, 200, 200))
    low, high = key_labels(per_map)
    draw.text((bar_x, 30), low, fill=(90, 90, 90), font=small_font)
    draw.text((bar_x + bar.shape[1], 30), high, fill=(90, 90, 90), font=small_font, anchor="ra")
    draw.line([(pad, header_h - 4), (sheet_w - pad, header_h - 4)], fill=(220, 220, 220), width=1)

    def cell(row: int, column: int) -> tuple[int, int]:
        return pad + column * (cell_w + pad), header_h + row * (cell_h + pad)

    for (row, column), lines in titles:
        x, y = cell(row, column)
        for number, line in enumerate(lines):
            draw.text(
                (x + cell_w / 2, y + 2 + _TITLE_LINE_H * number),
                line,
                fill=(30, 30, 30),
                font=font(14),
                anchor="ma",
            )
    geometry = {"cell": cell, "title_h": title_h, "note_y": note_y, "subheading_y": subheading_y}
    return sheet, geometry
