"""The contact sheet of one image: a header, then the original, each method's maps (one per
target for a class-specific method) and per chosen layer the head mean and every head, laid
out in bands that keep rows full where the tile counts allow (`layout`). Every tile says its
map's real range under its title (`paint.range_note`).

Text is drawn with Pillow's bundled FreeType font; what every sheet of a run shares (titles,
option lines, colour bar) is drawn once into a cached template.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from functools import cache, lru_cache
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...data.images import display_size
from . import colormaps
from .meta import mass_note
from .names import readable
from .options import AttentionOptions, Scale, Style
from .paint import Tile, overlay_tiles

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
    size = display_size(result.geometry.original_size, options.tile)
    if image.size != size:  # once, for the original and the overlays
        image = image.resize(size, Image.Resampling.BILINEAR)
    tiles = all_tiles(result, image, options, size)
    original = np.array(image)
    box_left, box_top, box_right, box_bottom = result.geometry.box
    original_w, original_h = result.geometry.original_size
    full = box_left <= 0 and box_top <= 0 and box_right >= original_w and box_bottom >= original_h
    note = "the model's input outlined" if not full else "what the model saw"
    cells = [("original", note, original), *((t.title, t.note, t.pixels) for t in tiles)]
    bands = [1] + [len(list(group)) for _, group in groupby(tiles, key=lambda t: t.band)]
    columns, places = layout(bands)
    rows = places[-1][0] + 1
    heatmap = options.style == Style.heatmap
    two_lines = any("\n" in note for _, note, _ in cells)
    title_h = _TITLE_H + (_NOTE_H if two_lines else 0)
    with _TEXT_LOCK:  # one FreeType face is shared by the rendering threads
        template, geometry = _sheet_template(
            size,
            columns,
            rows,
            tuple((place, title) for place, (title, _, _) in zip(places, cells)),
            ((model,) if model else ()) + header_parts(result, options),
            options.colormap.value if heatmap else "",
            title_h,
        )
        sheet = template.copy()
        draw = ImageDraw.Draw(sheet)
        text_w, pad = geometry["text_w"], _PAD
        title, subtitle = title_lines(result)
        draw.text((pad, 8), _fit(title, font(20), text_w), fill=(20, 20, 20), font=font(20))
        draw.text((pad, 38), _fit(subtitle, font(13), text_w), fill=(70, 70, 70), font=font(13))
        for (row, column), (_, tile_note, _) in zip(places, cells):
            x, y = geometry["cell"](row, column)
            for number, line in enumerate(tile_note.split("\n")):
                flat = line.endswith("(flat)")
                draw.text(
                    (x + geometry["cell_w"] / 2, y + 20 + number * _NOTE_H),
                    _fit(line, font(12), geometry["cell_w"]),
                    fill=(200, 60, 30) if flat else (110, 110, 110),
                    font=font(12),
                    anchor="ma",
                )
    for (row, column), (tile_title, _, pixels) in zip(places, cells):
        x, y = geometry["cell"](row, column)
        tile_x, tile_y = x + (geometry["cell_w"] - size[0]) // 2, y + title_h
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


def title_lines(result: ImageAttention) -> tuple[str, str]:
    """The sheet's two title lines: the predicted label by name and its score (and every
    target a class-specific map explains), then the file and which maps are the same for
    every class."""
    _, label, score = result.top[0]
    title = f"{readable(label)}  {score:.1%}"
    if result.targets:
        explained = ",  ".join(
            f"{key} = {readable(name)} {p:.1%}" for key, (_, name, p) in result.targets.items()
        )
        title += f"   ·   explained: {explained}"
    agnostic = [key for key, (_, target) in result.map_info.items() if target is None]
    agnostic += ["attention (raw)"] if result.heads is not None else []
    parts = [readable(Path(result.path).name), "predicted label (top-1)"]
    if agnostic:
        parts.append(
            " and ".join(agnostic)
            + ": the same for every class"
            + (", --target does not apply" if result.targets else "")
        )
    return title, "  ·  ".join(parts)


def model_phrase(reference: str, labels: tuple[str, ...]) -> str:
    """ "model vit-shapes-p16 (knows 6 classes: circle, ...)": a model with few classes says
    them all, so a photo labelled "ring" by a shapes model is read for what it is."""
    phrase = f"model {readable(reference)}"
    if 0 < len(labels) <= 12:
        phrase += f" (knows {len(labels)} classes: {', '.join(map(readable, labels))})"
    elif labels:
        phrase += f" ({len(labels)} classes)"
    return phrase


def header_parts(result: ImageAttention, options: AttentionOptions) -> tuple[str, ...]:
    """The options that shape what the sheet shows, one short phrase each."""
    parts = []
    if "rollout" in result.methods:
        parts.append(
            f"rollout: {options.head_fusion.value} over heads, discard {options.discard_ratio:g}"
        )
    heatmap = options.style == Style.heatmap
    parts.append(options.style.value + (f" {options.colormap.value}" if heatmap else ""))
    scale = options.scale.value
    if options.scale == Scale.per_map:
        scale += " scale (each tile stretched on its own: read its peak)"
    else:
        scale += " scale (0 to the largest value, for all heads together and per method)"
    parts.append(f"{options.interpolation.value}, {scale}")
    parts.append(f"grid {result.grid_size[0]}x{result.grid_size[1]}")
    if result.query == "probe":
        parts.append("class map: the MAP probe's attention (probe tiles, seeds rollout)")
    if result.head_query != "cls" and result.heads is not None:
        parts.append("no CLS token: layer maps are the mean over queries")
    elif result.query != "cls" and result.query != "probe":
        parts.append("no CLS token: mean over queries")
    if "dist" in result.queries:
        parts.append("CLS and dist query rows")
    if result.heads is not None and result.prefix_mass is not None and len(result.prefix_names):
        parts.append(
            "head maps renormalised over the patches; 2nd note line: raw mass on the prefix "
            "tokens (" + ", ".join(_prefix_groups(result.prefix_names)) + ")"
        )
    if options.threshold is not None:
        parts.append(f"outline: top patches with {options.threshold:g} of each head's mass")
    return tuple(parts)


def _prefix_groups(names: Sequence[str]) -> list[str]:
    groups = ["registers" if name.startswith("reg_") else name for name in names]
    return list(dict.fromkeys(groups))


def sheet_size(
    options: AttentionOptions, num_heads: int, num_layers: int, maps: int
) -> tuple[int, int]:
    """(width, height) of the largest sheet these options draw (a tall picture's tiles are
    `tile` high), to refuse absurd ones before any work. `maps`: single-map tiles."""
    bands = [1, maps] + ([num_heads + 1] * num_layers if options.heads else [])
    columns, places = layout([band for band in bands if band])
    rows = places[-1][0] + 1
    cell_w = max(options.tile, 150)
    width = _PAD + max(columns, 2) * (cell_w + _PAD)
    # The prefix-mass line (_NOTE_H) counted always: an upper bound is what this is for.
    return width, 200 + rows * (_TITLE_H + _NOTE_H + options.tile + _PAD) + _PAD


_PAD, _TITLE_H = 10, 38  # the title line and the range line above each tile
_NOTE_H = 15  # a second note line: the prefix tokens' mass
MIN_COLUMNS = 3
_TEXT_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _sheet_template(
    size: tuple[int, int],
    columns: int,
    rows: int,
    titles: tuple,
    parts: tuple,
    colormap: str,
    title_h: int = _TITLE_H,
):
    """The parts of a sheet every image of a run shares (titles, option lines, colour bar),
    drawn once: text rendering is a good share of the time of a sheet otherwise."""
    pad = _PAD
    small_font = font(13)
    cell_w = max(size[0], 150)
    cell_h = title_h + size[1]
    sheet_w = pad + max(columns, 2) * (cell_w + pad)
    colourbar_w = 170 if colormap else 0
    option_lines = _wrap(
        list(parts), small_font, sheet_w - 2 * pad
    )  # below the colour bar: full width
    header_h = 60 + 18 * len(option_lines) + 6
    sheet = Image.new("RGB", (sheet_w, header_h + rows * (cell_h + pad) + pad), (255, 255, 255))
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

    def cell(row: int, column: int) -> tuple[int, int]:
        return pad + column * (cell_w + pad), header_h + row * (cell_h + pad)

    for (row, column), title in titles:
        x, y = cell(row, column)
        draw.text(
            (x + cell_w / 2, y + 2),
            _fit(title, font(14), cell_w),
            fill=(30, 30, 30),
            font=font(14),
            anchor="ma",
        )
    text_w = sheet_w - 2 * pad - colourbar_w - (pad if colourbar_w else 0)
    return sheet, {"cell": cell, "cell_w": cell_w, "text_w": text_w}
