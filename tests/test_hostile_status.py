"""Usage errors exit 2 in every command, the same way: a wrong output name or kind, an option
out of range, found before any work starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vitcli.cli import app


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "x.jpg", "-o", "DIR"],
        ["embed", "x.jpg", "-o", "DIR"],
        ["eval", "lab", "-o", "DIR"],
        ["eval", "lab", "--confusion-png", "DIR"],
        ["score", "lab", "-o", "DIR"],
        ["export", "bundled", "DIR"],
        ["export", "bundled", "m.txt"],
        ["export", "bundled", "m.onnx", "--opset", "99"],
        ["export", "bundled", "m.onnx", "--image-size", "100000x100000"],
        ["export", "bundled", "m.onnx", "--attention-layer", "99999999999999999999"],
        ["export", "bundled", "m.onnx", "--image-size", "100x100"],
        ["convert", "bundled", "m.pt"],
        ["embed", "x.jpg", "-o", "e.txt"],
    ],
)
def test_usage_errors_exit_2(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    (tmp_path / "DIR.onnx").mkdir()
    args = ["DIR.onnx" if a == "DIR" and args[0] == "export" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
