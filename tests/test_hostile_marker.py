"""Outputs never become inputs: every folder vitcli creates for outputs holds a marker
(fileio.OUTPUT_MARKER) that the one input scanner and the training folder scanner skip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.data.folder import scan_image_folder
from vitcli.data.inputs import collect_inputs, glob_paths
from vitcli.fileio import OUTPUT_MARKER, mark_output_folder


def picture(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("marker", [OUTPUT_MARKER, ".vitcli-attention"])
def test_scans_and_globs_skip_marked_folders(tmp_path, marker):
    picture(tmp_path / "in" / "a.png")
    picture(tmp_path / "in" / "out" / "sheet.png")
    (tmp_path / "in" / "out" / marker).write_text("")
    found = [item.path for item in collect_inputs([str(tmp_path / "in")])]
    assert found == [str(tmp_path / "in" / "a.png")]
    assert glob_paths(str(tmp_path / "in" / "**" / "*.png")) == [str(tmp_path / "in" / "a.png")]


def test_a_marked_folder_named_itself_is_still_read(tmp_path):
    picture(tmp_path / "out" / "x.png")
    mark_output_folder(tmp_path / "out")
    assert len(collect_inputs([str(tmp_path / "out")])) == 1  # the user asked for it


def test_training_folders_skip_marked_classes_and_subfolders(tmp_path):
    for name in ("cat", "dog"):
        picture(tmp_path / "data" / name / "1.png")
    picture(tmp_path / "data" / "attention" / "1" / "sheet.png")
    mark_output_folder(tmp_path / "data" / "attention")
    picture(tmp_path / "data" / "cat" / "run" / "sheet.png")
    mark_output_folder(tmp_path / "data" / "cat" / "run")
    data = scan_image_folder(tmp_path / "data")
    assert data.classes == ["cat", "dog"] and len(data.samples) == 2


@pytest.mark.slow
def test_attention_into_its_input_folder_then_predict_reads_only_the_images(tmp_path):
    picture(tmp_path / "in" / "img1.png")
    picture(tmp_path / "in" / "img2.png")
    runner = CliRunner()
    written = runner.invoke(
        app, ["attention", str(tmp_path / "in" / "img1.png"), "--out", str(tmp_path / "in"), "-q"]
    )
    assert written.exit_code == 0, written.output
    assert (tmp_path / "in" / "img1" / OUTPUT_MARKER).exists()
    assert not (tmp_path / "in" / OUTPUT_MARKER).exists()  # the user's folder is not hidden
    result = runner.invoke(app, ["predict", str(tmp_path / "in"), "-f", "jsonl", "-q"])
    assert result.exit_code == 0, result.output
    paths = [line.split('"')[3] for line in result.stdout.splitlines()]
    assert paths == [str(tmp_path / "in" / "img1.png"), str(tmp_path / "in" / "img2.png")]


@pytest.mark.slow
def test_inspect_output_is_marked(tmp_path):
    out = tmp_path / "panels"
    result = CliRunner().invoke(app, ["inspect", "--out", str(out), "--max-images", "2"])
    assert result.exit_code == 0, result.output
    assert (out / OUTPUT_MARKER).exists()
    assert collect_inputs([str(tmp_path)], allow_empty=True) == []
