"""Decoding one image file into RGB, the way an image viewer would show it.

Two RGB conversions: "pil" is PIL's own `convert("RGB")`, exactly what the home libraries
call (transformers' load_image, timm's dataset, the originals' scripts: alpha dropped, 16-bit
clipped); "viewer" is what an image viewer shows (alpha composited on white, 16-bit and float
greyscale scaled), for vitcli's own models. EXIF orientation is applied or not, as the
checkpoint's home does. Animated files give their first frame; images too large to decode
safely are refused. Opt-in JPEG draft mode (`--fast-decode`) decodes large JPEGs at a
reduced DCT scale that is still at least the size the resize needs: several times faster,
and different pixels.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError, InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP ~ 300 MB as RGB


def pixel_limit() -> int:
    """The largest image (width x height) decoded: VITCLI_MAX_PIXELS, else 100 MP. Read at each
    call, so a command can check it once up front and workers see the same value."""
    value = os.environ.get("VITCLI_MAX_PIXELS", "").strip().replace("_", "")
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise InputError(
            f"VITCLI_MAX_PIXELS={os.environ['VITCLI_MAX_PIXELS']!r} is not a positive whole number "
            "of pixels; unset it (100 MP) or set e.g. VITCLI_MAX_PIXELS=200000000"
        )
    return limit


# EXIF orientations that swap width and height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


def display_size(original_size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) with the long side scaled to `long_side`, aspect kept (at least 1 px)."""
    width, height = original_size
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the full 16-bit range to 8 bits instead of clipping.
        array = np.asarray(image).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scale = 255.0 / (high - low) if high > low else 0.0
        array = np.nan_to_num((array - low) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _pil_rgb(image: Image.Image) -> Image.Image:
    """PIL's own conversion, as `Image.open(path).convert("RGB")` in the home libraries."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _hf_rgb(image: Image.Image) -> Image.Image:
    """transformers' pipeline with do_convert_rgb: load_image's convert("RGB"), then its
    convert_to_rgb, which composites on white what is still marked transparent (PIL keeps a
    palette's transparent colour in `info` through the conversion)."""
    image = _pil_rgb(image)
    if image.info.get("transparency") is None:
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _loaded(image: Image.Image) -> Image.Image:
    """The image in its own mode (rgb "late": converted after the resize); a lazily
    transposed or palette image is made a standalone copy so the file can close."""
    return image.copy() if image.mode not in ("RGB",) else image


def _open_regular(path: Path):
    """A binary file object for `path`, which must be a regular file. A FIFO, socket or device
    is refused from its stat alone; the open itself is non-blocking and checked again with
    fstat, so that a FIFO swapped in between can still never block the read."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ImageDecodeError(_special(path, mode))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise ImageDecodeError(
            f"{path}: permission denied; check the file's read permission"
        ) from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise ImageDecodeError(
                f"{path}: file name too long for this system; rename or move the file"
            ) from None
        raise ImageDecodeError(f"{path}: cannot read image ({error.strerror or error})") from None
    handle = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        raise ImageDecodeError(_special(path, mode))
    return handle


def _pixels(count: int) -> str:
    return f"{count / 1e6:.4g} MP" if count >= 1_000_000 else f"{count} pixels"


def _special(path: Path, mode: int) -> str:
    if stat.S_ISDIR(mode):
        return f"{path}: is a directory, not an image"
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a special file"
    )
    return f"{path}: not a regular file ({kind}); only regular image files are read"


def special_file_error(path: str | Path) -> str | None:
    """The error for a path that names a FIFO, socket, device or folder (from stat() alone:
    nothing is opened, so a FIFO cannot block), else None (a regular file, or a missing one,
    which decoding reports)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else _special(Path(path), mode)


def open_image(
    path: str | Path,
    draft_for: Callable[[int, int], tuple[int, int]] | None = None,
    max_pixels: int | None = None,
    exif: bool = True,
    rgb: str = "viewer",
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `path` to an RGB image; returns (image, full-resolution (width, height)).

    `draft_for(width, height)` gives, for the upright full-resolution size, the (width,
    height) the caller will resize to (e.g. `Preprocess.resized_size`); a JPEG at least twice
    that size is decoded at a reduced DCT scale that is still at least that size. The returned
    size is always the full-resolution upright size (upright only when `exif`).
    """
    path = Path(path)
    limit = max_pixels if max_pixels is not None else pixel_limit()
    handle = _open_regular(path)
    with handle:
        return _decode(path, handle, draft_for, limit, exif=exif, rgb=rgb)


def _decode(
    path: Path,
    handle,
    draft_for: Callable[[int, int], tuple[int, int]] | None,
    max_pixels: int,
    exif: bool = True,
    rgb: str = "viewer",
) -> tuple[Image.Image, tuple[int, int]]:
    # Pillow's own bomb check (a warning above MAX_IMAGE_PIXELS, an error above twice that)
    # would otherwise refuse at its default of 89 MP whatever VITCLI_MAX_PIXELS says: it is set
    # to our limit, its warning dropped, and the size checked below with a clearer message.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
    except Image.DecompressionBombError as error:
        # Pillow stops at twice its limit before we see the size; its message carries it.
        found = re.search(r"\((\d+) pixels\)", str(error))
        shown = f" ({_pixels(int(found.group(1)))})" if found else ""
        raise ImageDecodeError(
            f"{path}: image too large{shown} is over the {_pixels(max_pixels)} limit; "
            "downscale it first or raise VITCLI_MAX_PIXELS"
        ) from None
    except UnidentifiedImageError:
        size = os.fstat(handle.fileno()).st_size
        what = (
            "empty file (0 bytes)"
            if size == 0
            else "not a recognised image (corrupt, or not an image)"
        )
        raise ImageDecodeError(f"{path}: {what}") from None
    except OSError as error:
        raise ImageDecodeError(f"{path}: cannot read image ({error.strerror or error})") from None
    try:
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{path}: image too large: {width}x{height} ({_pixels(width * height)}) is "
                    f"over the {_pixels(max_pixels)} limit; downscale it first or raise "
                    "VITCLI_MAX_PIXELS"
                )
            if image.format != "JPEG":
                # Draft mode is JPEG-only; decode the rest now, because PNG's getexif() loads
                # the pixels itself and the guard below would turn a decode error into a
                # silently blank image.
                image.load()
            orientation = 1
            if exif:
                try:
                    orientation = int(image.getexif().get(0x0112, 1))
                except Exception:  # a broken EXIF block is not worth losing the image over
                    orientation = 1
            transposed = orientation in _TRANSPOSED_ORIENTATIONS
            if (
                draft_for is not None
                and image.format == "JPEG"
                and image.mode in ("RGB", "L", "YCbCr")
            ):
                want_w, want_h = draft_for(*((height, width) if transposed else (width, height)))
                if transposed:
                    want_w, want_h = want_h, want_w
                # Only worth it (and only changes pixels) when at least 2x larger than needed.
                if width >= 2 * want_w and height >= 2 * want_h:
                    image.draft("RGB", (want_w, want_h))
            image.load()
            upright = (height, width) if transposed else (width, height)
            convert = {"viewer": _to_rgb, "pil": _pil_rgb, "hf": _hf_rgb}.get(rgb, _loaded)
            if orientation != 1:
                return convert(ImageOps.exif_transpose(image)), upright
            return convert(image), upright
    except ImageDecodeError:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        message = str(error) or type(error).__name__
        raise ImageDecodeError(f"{path}: corrupt or truncated image ({message})") from None
