"""Every string from a file, a label or a name is escaped before it reaches a terminal, in
every table and message: no ESC, BEL or C1 byte of a label can clear or retitle the screen."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.model import ViT, ViTConfig
from vitcli.weights.format import save_model

LABELS = ["a\x1b[2Jclear", "b\x1b]0;title\x07", "c\x9bq"]
CONTROL = ("\x1b", "\x07", "\x9b")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("esc")
    config = ViTConfig(
        image_size=32, patch_size=8, num_classes=3, width=32, depth=1, num_heads=4, mlp_dim=32
    )
    torch.manual_seed(0)
    model = save_model(ViT(config).eval(), root / "m\x1b[31m.safetensors", labels=LABELS)
    for label in LABELS:
        os.makedirs(root / "lab" / label)
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "lab" / label / "0\x1b.png")
    return root, model


def clean(result, status: int = 0) -> str:
    assert result.exit_code == status, result.output
    assert not any(char in result.output for char in CONTROL), repr(result.output)
    return result.output


def test_eval_tables_and_confusion_matrix_escape_labels(hostile):
    root, model = hostile
    text = clean(CliRunner().invoke(app, ["eval", str(root / "lab"), "-m", str(model)]))
    assert "a\\x1b[2Jclear" in text and "confusion" in text


def test_eval_written_line_escapes_the_path(hostile, tmp_path):
    root, model = hostile
    report = tmp_path / "r\x1b[2J.json"
    result = CliRunner().invoke(
        app, ["eval", str(root / "lab"), "-m", str(model), "-q", "-o", str(report)]
    )
    assert "wrote" in clean(result) and report.exists()


def test_info_escapes_name_labels_and_path(hostile):
    _, model = hostile
    text = clean(CliRunner().invoke(app, ["info", str(model)]))
    assert "\\x1b" in text


def test_predict_table_escapes_labels_and_paths(hostile):
    root, model = hostile
    result = CliRunner().invoke(
        app, ["predict", str(root / "lab"), "-m", str(model), "-f", "table"]
    )
    assert "\\x1b" in clean(result)


def test_inspect_and_data_messages_escape_paths(hostile, tmp_path):
    root, model = hostile
    out = tmp_path / "in\x1b[2Jspect"
    result = CliRunner().invoke(
        app, ["inspect", "-m", str(model), "--out", str(out), "--images", str(root / "lab")]
    )
    clean(result)
    shapes = tmp_path / "sh\x1b[2Japes"
    result = CliRunner().invoke(app, ["data", "shapes", str(shapes), "--per-class", "1"])
    assert "wrote" in clean(result)


def test_info_json_escapes_every_control_character(hostile):
    import json

    _, model = hostile
    text = clean(CliRunner().invoke(app, ["info", str(model), "--json"]))
    assert json.loads(text)["labels"] == LABELS  # escaped, not changed
