"""No input is an error: every command that reads images exits 1 with one line saying that no
images were found, where it looked and which files count."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vitcli.cli import app


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "EMPTY"],
        ["embed", "EMPTY", "-o", "OUT/e.npy"],
        ["attention", "EMPTY", "--out", "OUT/att"],
        ["predict", "-"],
    ],
)
def test_an_empty_folder_or_stdin_is_one_error_line(tmp_path, tiny_model_file, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    args = [
        part.replace("EMPTY", str(empty)).replace("OUT", str(tmp_path / "out")) for part in command
    ]
    result = CliRunner().invoke(app, [*args, "-m", str(tiny_model_file)], input="")
    assert result.exit_code == 1, result.output
    where = "the paths on stdin" if args[-1] == "-" else str(empty)
    assert result.stderr.startswith(f"error: no images found in {where}"), result.stderr
    assert ".jpg" in result.stderr and result.stderr.count("\\n") == 0
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["eval", "EMPTY"], ["score", "EMPTY"]])
def test_labelled_commands_say_the_folder_is_empty(tmp_path, tiny_model_file, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [part.replace("EMPTY", str(empty)) for part in command]
    result = CliRunner().invoke(app, [*args, "-m", str(tiny_model_file)])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and str(empty) in result.stderr
    assert result.stderr.count("\n") == 1
