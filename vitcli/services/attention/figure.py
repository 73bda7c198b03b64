"""Text and keys for the pictures `vit attention` draws: the font, wrapping that never cuts a
word (a file name too long for its line loses its middle, not its end), each tile's size for
the image's aspect, the colour key of a style, and the caption of a --per-head PNG.

Text is drawn with Pillow's bundled FreeType font (Pillow >= 10.1; its bitmap font before).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...data.images import display_size
from . import colormaps

MAX_STRETCH = 2.0  # a tile's long side is at most this many times --tile (a 4:1 image's)
INK, MUTED, WARN = (30, 30, 30), (110, 110, 110), (200, 60, 30)
TEXT_LOCK = threading.Lock()  # one FreeType face is shared by the rendering threads


@cache
def font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType font, Pillow >= 10.1
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def tile_size(original_size: tuple[int, int], tile: int) -> tuple[int, int]:
    """(width, height) of an image's tiles: a square image's are `tile` wide, any other keeps
    the area of that square (long side `tile` * sqrt(aspect), at most MAX_STRETCH * `tile`), so
    a 1200x300 image gets 448x112 tiles instead of 224x56 ones."""
    width, height = original_size
    aspect = max(width, height) / max(1, min(width, height))
    return display_size(original_size, round(tile * min(math.sqrt(aspect), MAX_STRETCH)))


def display_long_side(tile: int) -> int:
    """The long side the decoder scales each original to for the sheet: the largest tile's."""
    return round(tile * MAX_STRETCH)


def sheet_original(image: Image.Image, original_size: tuple[int, int], tile: int) -> Image.Image:
    """The original at its tiles' size, by way of the decoder's display size (scaled down to
    `display_long_side` when larger, as the decoding worker does): a sheet drawn from the
    worker's display image and one drawn from a fresh decode get the same pixels."""
    step = display_size(original_size, display_long_side(tile))
    if image.width > step[0] and image.height > step[1]:
        image = image.resize(step, Image.Resampling.BILINEAR)
    size = tile_size(original_size, tile)
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def fit(text: str, face, width: float) -> str:
    """`text`, cut at the end with "…" when it is wider than `width` (notes, not names)."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def middle_ellipsis(text: str, face, width: float) -> str:
    """`text` with its middle replaced by "…" until it fits `width`: a long file name keeps
    its start and its extension ("holiday_2019_…_0042.jpg")."""
    if face.getlength(text) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2 :]
    while (head or tail) and face.getlength(head + "…" + tail) > width:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "…" + tail


def wrap_words(text: str, face, width: float) -> list[str]:
    """`text` on as many lines as it needs, broken between words; a single word wider than
    `width` is broken between characters. Nothing is cut."""
    lines: list[str] = []
    for word in text.split(" "):
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and face.getlength(trial) <= width:
            lines[-1] = trial
            continue
        while face.getlength(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and face.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


@lru_cache(maxsize=4096)
def wrapped(text: str, size: int, width: int) -> tuple[str, ...]:
    """`wrap_words` in `font(size)`, remembered: the titles of a run's sheets repeat."""
    return tuple(wrap_words(text, font(size), width))


def wrap_parts(parts: Sequence[str], face, width: float, separator: str = "  ·  ") -> list[str]:
    """Join `parts` with `separator` into as few lines as fit `width`; a part starts a new
    line rather than split, and one wider than a line is wrapped between its words."""
    lines: list[str] = []
    for part in parts:
        if lines and face.getlength(lines[-1] + separator + part) <= width:
            lines[-1] += separator + part
        else:
            lines.extend(wrap_words(part, face, width))
    return lines


def key_pixels(style: str, colormap: str, alpha: float, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: the colour key of a style, low on the left. A heatmap's is its
    colormap; a mask's is white dimmed as the photo is (1 - alpha at 0, as is at the peak)."""
    ramp = np.linspace(0.0, 1.0, width)[None, :].repeat(height, 0)
    if style == "heatmap":
        return colormaps.apply(ramp, colormap)
    level = 255.0 * ((1.0 - alpha) + alpha * ramp)
    return np.repeat((level + 0.5).astype(np.uint8)[..., None], 3, axis=2)


def key_labels(per_map: bool, one: bool = False) -> tuple[str, str]:
    """What the two ends of the colour key stand for under a --scale (`one`: on one map's
    own picture rather than on a sheet)."""
    if per_map:
        return "0", "this map's peak" if one else "each map's peak"
    return "0", "shared max" if one else "its group's largest"


def captioned(
    pixels: np.ndarray,
    title: str,
    note: str,
    key: np.ndarray,
    labels: tuple[str, str],
) -> np.ndarray:
    """A --per-head PNG: the overlay above a white strip with its title, its note lines (the
    peak over uniform, the prefix mass) and the colour key with what its ends mean."""
    height, width = pixels.shape[:2]
    canvas_w = max(width, 200)  # a very tall image's caption still fits its key and words
    pad, text_w = 8, canvas_w - 16
    with TEXT_LOCK:
        titles = wrap_words(title, font(15), text_w)
        notes = [line for part in note.split("\n") for line in wrap_words(part, font(13), text_w)]
        strip_h = pad + 19 * len(titles) + 16 * len(notes) + 6 + key.shape[0] + 18 + pad
        image = Image.new("RGB", (canvas_w, height + strip_h), (255, 255, 255))
        image.paste(Image.fromarray(pixels), (0, 0))
        draw = ImageDraw.Draw(image)
        y = height + pad
        for line in titles:
            draw.text((pad, y), line, fill=INK, font=font(15))
            y += 19
        for line in notes:
            flat = line.endswith("(flat)")
            draw.text((pad, y), line, fill=WARN if flat else MUTED, font=font(13))
            y += 16
        y += 6
        bar = key[:, : min(key.shape[1], text_w)]
        image.paste(Image.fromarray(np.ascontiguousarray(bar)), (pad, y))
        # outlined: a mask's key ends in white, on white
        draw.rectangle([pad - 1, y - 1, pad + bar.shape[1], y + bar.shape[0]], outline=(200,) * 3)
        y += bar.shape[0] + 2
        draw.text((pad, y), labels[0], fill=MUTED, font=font(12))
        draw.text((pad + bar.shape[1], y), labels[1], fill=MUTED, font=font(12), anchor="ra")
    return np.asarray(image)
