"""Decoding the awkward files a photo folder holds: each one decodes as a viewer shows it, or
fails with a one-line reason, quickly and without eating memory."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitcli.data.images import open_image
from vitcli.data.inputs import collect_inputs
from vitcli.errors import ImageDecodeError


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Photo-like RGB content (smooth gradients plus noise): neither flat nor pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height, with almost no pixel data:
    what a decompression bomb looks like before anyone decodes it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# name -> None when it must decode, else a fragment of the expected error message.
CASES = {
    "ok.jpg": None,
    "cmyk.jpg": None,
    "gray16.png": None,
    "gray16.tif": None,
    "palette_transparent.png": None,
    "la.png": None,
    "rgba.png": None,
    "exif_rotated.jpg": None,
    "animated.gif": None,
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "zero.jpg": "empty file",
    "text.jpg": "not a recognised image",
    "corrupt.jpg": "not a recognised image",
    "corrupt.png": "corrupt or truncated",
    "bomb.png": "too large",
}


def write_cases(folder: Path) -> dict[str, str | None]:
    """Write every awkward case into `folder`; returns CASES."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo(64, 48)
    Image.fromarray(rgb).save(folder / "ok.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    gray16 = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    Image.fromarray(gray16).save(folder / "gray16.tif")
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(folder / "palette_transparent.png", transparency=0)
    Image.fromarray(rgb).convert("LA").save(folder / "la.png")
    rgba = np.dstack([rgb, np.full((48, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    frames = [Image.fromarray(photo(32, 32, seed=s)).quantize(colors=64) for s in (1, 2)]
    frames[0].save(
        folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0
    )
    data = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(photo(64, 64)).save(folder / "full.png")
    (folder / "truncated.png").write_bytes((folder / "full.png").read_bytes()[:2000])
    (folder / "full.png").unlink()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a text file that only looks like a JPEG by name\n")
    noise = np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (folder / "corrupt.jpg").write_bytes(data[:30] + noise)
    Image.fromarray(rgb).save(folder / "good.png")
    (folder / "corrupt.png").write_bytes((folder / "good.png").read_bytes()[:60] + noise)
    (folder / "good.png").unlink()
    (folder / "bomb.png").write_bytes(png_header_only(30000, 30000))  # 900 MP
    return CASES


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases")
    write_cases(folder)
    return folder


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_case_decodes_to_rgb_or_fails_with_a_reason(cases, name):
    expected_error = CASES[name]
    if expected_error is None:
        image, size = open_image(cases / name)
        assert image.mode == "RGB" and image.size == size
    else:
        with pytest.raises(ImageDecodeError, match=expected_error) as info:
            open_image(cases / name)
        assert str(info.value).startswith(str(cases / name)) and "\n" not in str(info.value)


def test_exif_rotation_is_applied_as_a_viewer_would(cases):
    rotated, size = open_image(cases / "exif_rotated.jpg")
    with Image.open(cases / "exif_rotated.jpg") as raw:
        stored = np.asarray(raw.convert("RGB"))
    assert raw.size == (64, 48) and size == (48, 64) and rotated.size == (48, 64)
    # Orientation 6 means: rotate 90 degrees clockwise for display.
    assert np.array_equal(np.asarray(rotated), np.rot90(stored, k=-1))


def test_animated_gif_gives_its_first_frame(cases):
    image, _ = open_image(cases / "animated.gif")
    with Image.open(cases / "animated.gif") as gif:
        assert gif.n_frames == 2
        first = np.asarray(gif.convert("RGB"))
        gif.seek(1)
        second = np.asarray(gif.convert("RGB"))
    assert np.array_equal(np.asarray(image), first) and not np.array_equal(first, second)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(cases):
    for name in ("gray16.png", "gray16.tif"):
        array = np.asarray(open_image(cases / name)[0])
        assert array[0, 0].tolist() == [0, 0, 0] and array[-1, -1].tolist() == [255, 255, 255]
        assert 120 <= array[15, 20, 0] <= 135  # mid-range stays mid-grey, not white


def test_alpha_and_palette_transparency_composite_on_white(cases):
    rgba = np.asarray(open_image(cases / "rgba.png")[0])
    assert (rgba[:, :32] == 255).all()  # transparent half -> white
    assert np.array_equal(rgba[:, 32:], photo(64, 48)[:, 32:])  # opaque half unchanged
    palette = np.asarray(open_image(cases / "palette_transparent.png")[0])
    with Image.open(cases / "palette_transparent.png") as raw:
        transparent = np.asarray(raw) == 0
    assert transparent.any() and (palette[transparent] == 255).all()
    la = np.asarray(open_image(cases / "la.png")[0])
    assert (la[..., 0] == la[..., 1]).all()  # greyscale stays grey


def test_cmyk_keeps_its_colours(cases):
    cmyk = np.asarray(open_image(cases / "cmyk.jpg")[0]).astype(float)
    assert np.abs(cmyk.mean(axis=(0, 1)) - photo(64, 48).mean(axis=(0, 1))).max() < 8


def test_decompression_bomb_is_refused_fast_and_small(cases):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="too large"):
        open_image(cases / "bomb.png")
    assert time.perf_counter() - start < 1.0
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000
    )  # KiB: no 900 MP buffer


def test_our_pixel_limit_refuses_with_what_to_do(cases):
    with pytest.raises(
        ImageDecodeError,
        match=r"too large \(3072 pixels\) is over the 1000 pixels limit; downscale it first "
        "or raise VITCLI_MAX_PIXELS",
    ):
        open_image(cases / "ok.jpg", max_pixels=1000)


def test_draft_mode_decodes_large_jpegs_small_but_reports_the_full_size(tmp_path):
    Image.fromarray(photo(1600, 1200)).save(tmp_path / "big.jpg", quality=90)
    image, size = open_image(tmp_path / "big.jpg", draft_for=lambda w, h: (224, 224))
    assert size == (1600, 1200)
    assert 224 <= image.size[0] < 800 and 224 <= image.size[1] < 600  # DCT-scaled, still >= target


def _without_root_override() -> list[str] | None:
    """A command prefix under which file permissions apply to us, or None.

    Root reads mode-000 files (CAP_DAC_OVERRIDE), so as root the check runs in a child that
    drops those capabilities with setpriv; as any other user chmod alone is enough.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    probe = subprocess.run(prefix + ["true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def test_unreadable_file_and_folder_are_reported_not_skipped(tmp_path):
    prefix = _without_root_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot stop root from reading")
    Image.fromarray(photo(16, 16)).save(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(photo(16, 16)).save(tmp_path / "sub" / "inside.png")
    (tmp_path / "sub").chmod(0)
    script = (
        "import sys\n"
        "from vitcli.data.images import open_image\n"
        "from vitcli.data.inputs import collect_inputs\n"
        "from vitcli.errors import ImageDecodeError\n"
        "try:\n"
        "    open_image(sys.argv[1] + '/locked.png')\n"
        "except ImageDecodeError as error:\n"
        "    print(error)\n"
        "for item in collect_inputs([sys.argv[1]]):\n"
        "    print(item.path, '|', item.error)\n"
    )
    try:
        result = subprocess.run(
            prefix + [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        (tmp_path / "sub").chmod(0o755)
        (tmp_path / "locked.png").chmod(0o644)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{tmp_path}/locked.png: permission denied; check the file's read permission"
    assert lines[1] == f"{tmp_path}/locked.png | None"  # listed; reading it fails later, per file
    assert (
        lines[2] == f"{tmp_path}/sub | {tmp_path}/sub: cannot list folder (permission denied); "
        "its images were skipped"
    )


def test_folder_scan_is_natural_order_images_only(tmp_path):
    for name in ("img10.png", "img2.PNG", "img1.jpeg", "notes.txt", ".hidden.png", "IMG3.WebP"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "a.tiff").write_bytes(b"")
    paths = [
        Path(item.path).relative_to(tmp_path).as_posix() for item in collect_inputs([str(tmp_path)])
    ]
    assert paths == ["img1.jpeg", "img2.PNG", "IMG3.WebP", "img10.png", "nested/a.tiff"]
