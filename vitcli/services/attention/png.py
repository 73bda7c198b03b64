"""A fast PNG encoder for the pictures `vit attention` writes (a sheet per input image)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

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
