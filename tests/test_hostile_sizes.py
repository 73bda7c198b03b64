"""Every size an option declares is bounded before anything is allocated, with the limit in
the one-line message (exit 2): batch sizes in every command, export's image size and the
attention matrices its check would hold, the ONNX opset."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.errors import OptionError
from vitcli.model import ViTConfig
from vitcli.runtime import MAX_BATCH, MAX_IMAGE_SIDE
from vitcli.services.export import check_trace_memory
from vitcli.services.onnx_graph import MAX_OPSET, MIN_OPSET

HUGE = "99999999999999999999"
# Each command with the arguments it needs to get as far as its options.
COMMANDS = {
    "predict": ["predict", "x.jpg"],
    "embed": ["embed", "x.jpg", "-o", "e.jsonl"],
    "eval": ["eval", "lab"],
    "attention": ["attention", "x.jpg", "--out", "o"],
    "inspect": ["inspect", "--out", "o"],
    "score": ["score", "shapes"],
    "train": ["train", "lab", "--out", "o"],
}


@pytest.mark.parametrize("value", [HUGE, str(MAX_BATCH + 1), "0", "-1"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_batch_size_is_bounded_in_every_command(tmp_path, monkeypatch, command, value):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*COMMANDS[command], "-b", value])
    assert result.exit_code == 2, result.output
    assert "--batch-size" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    if value == HUGE:
        assert str(MAX_BATCH) in result.output.replace(",", "") or "4096" in result.output


@pytest.mark.parametrize(
    "size", ["100000x100000", HUGE, f"{MAX_IMAGE_SIDE + 1}", f"224x{MAX_IMAGE_SIDE + 8}", "0"]
)
def test_export_image_size_is_bounded_before_the_model_loads(tmp_path, size):
    # A real process, so a regression shows as memory growth or a hang, not a mock passing.
    result = subprocess.run(
        [sys.executable, "-m", "vitcli", "export", "bundled", str(tmp_path / "m.onnx")]
        + ["--image-size", size],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --image-size")
    if size != "0":
        assert str(MAX_IMAGE_SIDE) in lines[0]
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", ["99", "13", "-1", HUGE])
def test_export_opset_out_of_range_is_a_usage_error(tmp_path, opset):
    result = CliRunner().invoke(
        app, ["export", "bundled", str(tmp_path / "m.onnx"), "--opset", opset]
    )
    assert result.exit_code == 2, result.output
    assert "--opset" in result.output
    assert str(MAX_OPSET) in result.output or str(MIN_OPSET) in result.output


def test_attention_matrices_of_the_export_check_are_bounded():
    config = ViTConfig(image_size=224, patch_size=16, width=192, depth=1, num_heads=3)
    check_trace_memory(config, (384, 384), count=16)  # 577 tokens: fine
    with pytest.raises(OptionError, match="GiB limit; use a smaller --image-size"):
        check_trace_memory(config, (4096, 4096), count=2)  # 65,537 tokens: ~96 GiB
