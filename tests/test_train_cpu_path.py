"""The CPU path of `vit train`: a from-scratch run on the CPU says how long it will take and
names the faster path; fine-tuning from a run folder (or any model) says neither."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from checkpoints import colour_folder
from typer.testing import CliRunner

from vitcli.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ["--image-size", "32", "--depth", "1", "--width", "32", "--heads", "2", "--mlp-dim", "64"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("cpu") / "colours")


def train(*args: str):
    common = ["--epochs", "2", "-b", "2", "--workers", "0", "--device", "cpu", "-q"]
    return CliRunner().invoke(app, ["train", *args, *common])


def test_scratch_on_the_cpu_says_how_long_and_what_is_faster(colours, tmp_path):
    result = train(str(colours), "--out", str(tmp_path / "a"), "--model", "Ti/8", *TINY)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "from scratch on the CPU" in line]
    assert len(notes) == 1, result.stderr  # once, after the first steps
    assert re.search(
        r"at [\d.]+ img/s this run takes about \d+ (s|min) \(2 epochs of 12 images\)", notes[0]
    ), notes[0]
    assert "--model bundled" in notes[0]

    tuned = train(str(colours), "--out", str(tmp_path / "b"), "--model", str(tmp_path / "a"))
    assert tuned.exit_code == 0, tuned.output
    assert f"note: using {tmp_path / 'a' / 'best.safetensors'}" in tuned.stderr
    assert "from scratch on the CPU" not in tuned.stderr
