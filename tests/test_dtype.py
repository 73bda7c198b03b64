"""`--dtype bfloat16` on predict, embed, eval and attention: close to float32 where the CPU has
native bf16, refused in one line where it has not (runtime.resolve_dtype)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_LABELS
from PIL import Image
from typer.testing import CliRunner

from vitcli import runtime
from vitcli.cli import app
from vitcli.services.attention import AttentionOptions, attention_batches
from vitcli.services.evaluate import evaluate
from vitcli.weights.resolve import load_model


@pytest.fixture
def images(tmp_path):
    """Two class folders named after the tiny model's labels, two photos each."""
    rng = np.random.default_rng(0)
    for label in TINY_LABELS[:2]:
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{i}.png")
    return tmp_path / "data"


@pytest.fixture
def native_bf16(monkeypatch):
    """Any CPU runs these tiny models in bf16 (emulated, slowly, where it has no bf16)."""
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)


@pytest.mark.parametrize("command", ["predict", "embed", "eval", "attention"])
def test_refused_in_one_line_on_a_cpu_without_native_bf16(
    monkeypatch, tmp_path, images, tiny_model_file, command
):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    target = {
        "predict": [str(images)],
        "embed": [str(images), "-o", str(tmp_path / "e.npy")],
        "eval": [str(images)],
        "attention": [str(images), "--out", str(tmp_path / "maps")],
    }[command]
    args = [command, *target, "-m", str(tiny_model_file), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--dtype", "bfloat16"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --dtype bfloat16: this CPU")
    assert not (tmp_path / "maps").exists() and not (tmp_path / "e.npy").exists()


def test_eval_in_bfloat16_agrees_with_float32(native_bf16, images, tiny_model_file):
    full = evaluate(images, load_model(tiny_model_file), workers=0, device="cpu")
    half = evaluate(
        images, load_model(tiny_model_file), workers=0, device="cpu", dtype=torch.bfloat16
    )
    assert half.predictions == full.predictions


def test_attention_maps_in_bfloat16_follow_float32(native_bf16, images, tiny_model_file):
    paths = sorted(str(p) for p in images.rglob("*.png"))
    maps = {}
    for dtype in ("float32", "bfloat16"):
        options = AttentionOptions(
            methods=("rollout", "gae"), heads=True, workers=0, device="cpu", dtype=dtype
        )
        ((results, failures),) = list(
            attention_batches(load_model(tiny_model_file), paths, options)
        )
        assert not failures
        maps[dtype] = results
    for full, half in zip(maps["float32"], maps["bfloat16"]):
        assert half.head_mean.dtype == np.float32
        for name, array in full.methods.items():
            r = np.corrcoef(array.ravel(), half.methods[name].ravel())[0, 1]
            assert r > 0.95, (name, r)
        r = np.corrcoef(full.head_mean.ravel(), half.head_mean.ravel())[0, 1]
        assert r > 0.95
