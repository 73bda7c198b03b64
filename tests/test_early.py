"""Decoding started before torch is imported (services/early.py): the preprocessing forecast
from a checkpoint's small files (weights/peek.py), the hand-over to the loader
(data/decoders.py EarlyDecoding), and pixels through shared memory (PixelSlots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import TINY_LABELS, hf_folder, random_vit, timm_folder, write_npz
from PIL import Image

from vitcli.data.decoders import IN_SLOT, EarlyDecoding, ImageFiles, PixelSlots, decode_images
from vitcli.data.loader import image_batches
from vitcli.data.preprocess import Preprocess
from vitcli.weights.format import save_model
from vitcli.weights.peek import peek_preprocess
from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]


def photos(folder: Path, count: int = 7) -> list[str]:
    """Odd-sized photos, one greyscale, one that is not an image at all."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        height, width = 37 + 11 * i, 61 - 3 * i
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L" if i == 2 else "RGB")
        paths.append(str(folder / f"{i}.jpg"))
        image.save(paths[-1], quality=90)
    (folder / "3.jpg").write_bytes(b"not a jpeg")
    return paths


def checkpoints(root: Path) -> dict[str, str | None]:
    """One of each kind `peek_preprocess` reads, as `--model` would name it."""
    model = random_vit()
    ours = save_model(model, root / "tiny.safetensors", labels=TINY_LABELS, source="test")
    odd = Preprocess(size=(32, 32), resize="shorter", crop_pct=0.8, interpolation="bicubic")
    custom = save_model(model, root / "custom.safetensors", labels=TINY_LABELS, preprocess=odd)
    run = root / "run"
    run.mkdir()
    save_model(model, run / "best.safetensors", labels=TINY_LABELS, source="run, epoch 2")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 2, "val_top1": 0.5}) + "\n")
    hf = hf_folder(root / "hf")
    hf_cropped = hf_folder(root / "hf-cropped")
    (hf_cropped / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "ViTImageProcessor",
                "size": {"height": 41, "width": 37},
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "image_mean": [0.1, 0.2, 0.3],
            }
        )
    )
    timm = timm_folder(
        root / "timm",
        model,
        pretrained_cfg={"input_size": [3, 32, 32], "crop_pct": 0.9, "interpolation": "bicubic"},
    )
    single = root / "single"
    single.mkdir()
    save_model(model, single / "only.safetensors", labels=TINY_LABELS)
    return {
        "bundled (no --model)": None,
        "bundled by name": "bundled",
        "vitcli file": str(ours),
        "vitcli file, own recipe": str(custom),
        "run folder": str(run),
        "hf folder": str(hf),
        "hf folder with a processor": str(hf_cropped),
        "hf weights file": str(hf / "model.safetensors"),
        "timm folder": str(timm),
        "folder of one file": str(single),
    }


def test_the_forecast_is_what_the_loader_reads(tmp_path):
    for name, reference in checkpoints(tmp_path).items():
        forecast = peek_preprocess(reference)
        assert forecast is not None, name
        assert forecast == load_model(reference).preprocess, name


def test_no_forecast_where_it_cannot_be_told_cheaply(tmp_path):
    npz = write_npz(tmp_path / "w.npz", {"cls": np.zeros((1, 1, 8), np.float32)})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    for reference in (
        "google/vit-base-patch16-224",  # a hub id: the hub client decides
        str(npz),
        str(tmp_path / "missing.safetensors"),
        "dino:" + str(tmp_path / "x.pth"),
        str(tmp_path / "broken"),
        str(tmp_path / "bad.safetensors"),
    ):
        assert peek_preprocess(reference) is None, reference


def test_decoding_starts_before_torch_is_imported(tmp_path, tiny_model_file):
    paths = photos(tmp_path / "photos")
    script = (
        "import sys\n"
        "from vitcli.services.early import start_early\n"
        f"early = start_early({str(tiny_model_file)!r}, [{str(tmp_path / 'photos')!r}], "
        "batch_size=4, workers=1, fast_decode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(early.items), early.decoding is not None, early.decoding.decoding.workers)\n"
        "early.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(paths)), "True", "1"]


def batches_of(paths, preprocess, **options):
    return [
        (batch.indices, batch.pixels.clone(), batch.failures)
        for batch in image_batches(paths, preprocess, batch_size=3, **options)
    ]


def same(got, want):
    assert len(got) == len(want)
    for (indices, pixels, failures), (indices_, pixels_, failures_) in zip(got, want):
        assert indices == indices_ and failures == failures_
        assert torch.equal(pixels, pixels_)


def test_the_loader_takes_over_the_early_decoding_and_gets_the_same_pixels(tmp_path):
    paths = photos(tmp_path / "photos")
    preprocess = Preprocess(size=(24, 24), resize="shorter", interpolation="bicubic")
    early = EarlyDecoding(ImageFiles(paths, preprocess), workers=1, batch_size=3)
    got = batches_of(paths, preprocess, workers=1, early=early)
    assert early.adopted and early.decoding is None
    same(got, batches_of(paths, preprocess, workers=0))
    assert any(failures for _, _, failures in got)  # the broken file is reported, in place


@pytest.mark.parametrize("change", ["preprocess", "paths", "draft", "batch size"])
def test_a_wrong_forecast_is_thrown_away(tmp_path, change):
    paths = photos(tmp_path / "photos")
    asked = Preprocess(size=(24, 24))
    started = Preprocess(size=(16, 16)) if change == "preprocess" else asked
    early_paths = paths[::-1] if change == "paths" else paths
    early = EarlyDecoding(
        ImageFiles(early_paths, started, draft=change == "draft"),
        workers=1,
        batch_size=1 if change == "batch size" else 3,  # 2 in flight: too few for a batch of 3
    )
    got = batches_of(paths, asked, workers=1, early=early)
    assert not early.adopted and early.decoding is None
    same(got, batches_of(paths, asked, workers=0))


def test_closing_an_early_decoding_nobody_took_stops_its_workers(tmp_path):
    paths = photos(tmp_path / "photos")
    early = EarlyDecoding(ImageFiles(paths, Preprocess(size=(24, 24))), workers=1, batch_size=3)
    decoding = early.decoding
    assert decoding is not None and decoding.pool is not None
    early.close()
    assert decoding.pool is None and early.decoding is None


def test_pixels_through_shared_slots_equal_the_pipe(tmp_path):
    paths = photos(tmp_path / "photos", count=9)
    preprocess = Preprocess(size=(20, 28), resize="shorter", crop_pct=0.9)
    dataset = ImageFiles(paths, preprocess)
    with decode_images(dataset, workers=2, batch_size=2) as decoded:  # 4 slots for 9 images
        assert decoded.unpack is not None
        items = list(decoded)
    inline = [dataset[i] for i in range(len(paths))]
    for item, want in zip(items, inline):
        assert item[0] == want[0] and item[4] == want[4]
        if want[1] is None:
            assert item[1] is None
        else:
            assert isinstance(item[1], np.ndarray) and np.array_equal(item[1], want[1])


def test_an_array_of_another_shape_travels_the_usual_way():
    slots = PixelSlots(2, (3, 4, 4))
    odd = (5, np.ones((3, 4, 5), np.uint8), None, None, None)
    assert slots.pack(5, odd) is odd
    packed = slots.pack(5, (5, np.full((3, 4, 4), 7, np.uint8), "geometry", None, None))
    assert packed[1] == IN_SLOT
    unpacked = slots.unpack(packed)
    assert unpacked[2] == "geometry" and (unpacked[1] == 7).all()


def test_freed_memory_is_kept_unless_the_user_tuned_glibc():
    """runtime.keep_freed_memory, in a fresh process each time (mallopt is process-wide)."""
    import platform

    code = "from vitcli.runtime import keep_freed_memory; print(keep_freed_memory())"
    expected = str(sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    for env, want in (({}, expected), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "False")):
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**os.environ, **env},
        )
        assert done.stdout.strip() == want, done.stderr


@pytest.mark.parametrize("cpus, training, other", [(1, 0, 1), (2, 0, 1), (4, 2, 2), (64, 8, 8)])
def test_training_decodes_in_the_main_process_on_two_cpus(monkeypatch, cpus, training, other):
    """On 2 CPUs the training step needs both cores (runtime.default_training_workers); the
    inference commands keep their worker, which decodes while torch is imported."""
    from vitcli import runtime

    monkeypatch.setattr(runtime, "cpu_count", lambda: cpus)
    assert runtime.default_training_workers() == training
    assert runtime.resolve_workers(None, default=runtime.default_training_workers()) == (
        training,
        None,
    )
    assert runtime.resolve_workers(None) == (other, None)
    assert runtime.resolve_workers(1, default=0) == (1, None)  # asked for: kept
