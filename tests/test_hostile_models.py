"""Models whose numbers are not finite (NaN weights, NaN attention) end in one line and exit
1 in every command that uses their outputs; no JSON we write ever holds NaN or Infinity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.data.shapes import SHAPES
from vitcli.model import ViT, ViTConfig
from vitcli.services.train.rundir import metrics_jsonl
from vitcli.text import json_bytes
from vitcli.weights.format import save_model

CONFIG = ViTConfig(
    image_size=32, patch_size=8, num_classes=6, width=32, depth=1, num_heads=4, mlp_dim=32
)
BROKEN = {
    "head": lambda m: m.head.bias.__setitem__(0, float("nan")),
    "qkv": lambda m: m.blocks[0].attn.qkv.weight.__setitem__((0, 0), float("nan")),
    "everything": lambda m: [p.fill_(float("nan")) for p in m.parameters()],
    "infinite": lambda m: m.head.bias.fill_(float("inf")),
}


def model_file(folder: Path, broken: str | None) -> Path:
    torch.manual_seed(0)
    model = ViT(CONFIG).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
        if broken:
            BROKEN[broken](model)
    return save_model(model, folder / f"{broken}.safetensors", labels=list(SHAPES))


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lab")
    for index, label in enumerate(SHAPES[:2]):
        (root / label).mkdir()
        for i in range(2):
            pixels = np.random.default_rng(index * 10 + i).integers(0, 256, (20, 20, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"{i}.png")
    return root


def one_line(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors and all(fragment in errors[0] for fragment in fragments), result.output
    return errors[0]


@pytest.mark.parametrize("broken", ["head", "qkv", "everything", "infinite"])
def test_eval_refuses_a_model_whose_output_is_not_finite(tmp_path, lab, broken):
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["eval", str(lab), "-m", str(model_file(tmp_path, broken)), "-o", str(report)]
    )
    one_line(result, "not finite", "broken weights")
    assert "top-1" not in result.output and not report.exists()


@pytest.mark.parametrize("broken", ["head", "qkv", "everything"])
def test_attention_gives_an_error_record_and_no_nan_in_meta(tmp_path, lab, broken):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["attention", str(lab / SHAPES[0] / "0.png"), "-m", str(model_file(tmp_path, broken))]
        + ["--out", str(out), "--explore"],
    )
    one_line(result, "not finite")
    for meta in out.rglob("*.json"):
        json.loads(meta.read_text(), parse_constant=pytest.fail)


@pytest.mark.parametrize("broken", ["qkv", "everything"])
def test_inspect_refuses_nan_attention_and_nan_filters(tmp_path, lab, broken):
    result = CliRunner().invoke(
        app,
        ["inspect", "-m", str(model_file(tmp_path, broken)), "--out", str(tmp_path / "i")]
        + ["--images", str(lab)],
    )
    one_line(result, "not finite")
    assert not (tmp_path / "i" / "inspect.json").exists()


def test_score_refuses_a_model_whose_output_is_not_finite(tmp_path):
    data = tmp_path / "shapes"
    made = CliRunner().invoke(app, ["data", "shapes", str(data), "--per-class", "1", "-q"])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(
        app,
        ["score", str(data), "-m", str(model_file(tmp_path, "head")), "--limit", "2"]
        + ["--method", "raw", "-o", str(tmp_path / "s.json")],
    )
    one_line(result, "not finite")
    assert "nan" not in result.output.lower().replace("nan or", "")
    assert not (tmp_path / "s.json").exists()


def test_json_documents_never_hold_nan_or_infinity():
    with pytest.raises(ValueError):
        json_bytes({"score": float("nan")})
    rows = metrics_jsonl([{"epoch": 1, "val_loss": float("inf"), "train_loss": math.nan}])
    assert json.loads(rows) == {"epoch": 1, "val_loss": None, "train_loss": None}
