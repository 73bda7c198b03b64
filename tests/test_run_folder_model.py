"""A `vit train --out` folder is a model everywhere `-m/--model` is taken: its best model, with
a note naming the file; its state.pt points to the model files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import colour_folder
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.errors import CheckpointError
from vitcli.services.train import TrainConfig, run, rundir
from vitcli.weights import locate, resolve
from vitcli.weights.format import load_vitcli_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """Two epochs of a tiny model on three colours, with validation."""
    root = tmp_path_factory.mktemp("runfolder")
    colour_folder(root / "data", per_class=8)
    config = TrainConfig(
        data=str(root / "data"),
        out=str(root / "run"),
        model="Ti/8",
        image_size=32,
        depth=1,
        width=32,
        num_heads=2,
        mlp_dim=64,
        epochs=2,
        batch_size=8,
        workers=0,
        val_split=0.25,
    )
    run(config)
    return root / "run"


def test_names_match_what_a_run_writes():
    assert (locate.RUN_BEST, locate.RUN_LAST, locate.RUN_STATE) == (
        rundir.BEST_FILE,
        rundir.LAST_FILE,
        rundir.STATE_FILE,
    )


def test_a_run_folder_loads_its_best_model_and_says_so(run_folder):
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda row: row["val_top1"])  # the first of equals, as training does
    bundle = resolve.load_model(str(run_folder))
    expected = load_vitcli_file(run_folder / "best.safetensors")
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name
    assert bundle.labels == ["blue", "green", "red"]  # folders in natural order
    assert bundle.extra["run_model"] == (
        f"using {run_folder / 'best.safetensors'} (best validation top-1 "
        f"{best['val_top1']:.3f}, epoch {best['epoch']})"
    )


def test_without_a_best_file_the_last_epoch_is_used(run_folder, tmp_path):
    copy = Path(shutil.copytree(run_folder, tmp_path / "run"))
    (copy / "best.safetensors").unlink()
    chosen, line = locate.run_folder_model(copy)
    assert chosen == copy / "last.safetensors"
    assert line.startswith(f"using {chosen} (validation top-1 ") and line.endswith("epoch 2)")


def test_state_pt_points_to_the_model_files(run_folder):
    with pytest.raises(CheckpointError) as caught:
        resolve.load_model(str(run_folder / "state.pt"))
    message = str(caught.value)
    assert "training state" in message and "not a model" in message
    assert f"pass the run folder {run_folder}" in message and "last.safetensors" in message


def test_cli_commands_take_the_run_folder_and_print_the_note(run_folder, examples_dir):
    runner = CliRunner()
    image = str(examples_dir / "shapes-star.jpg")
    for args in (
        ["predict", image, "-m", str(run_folder), "-f", "jsonl", "-w", "0"],
        ["eval", str(run_folder.parent / "data"), "-m", str(run_folder), "-w", "0"],
        ["info", str(run_folder)],
        ["convert", str(run_folder), str(run_folder.parent / "copy.safetensors")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert f"note: using {run_folder / 'best.safetensors'} (best validation top-1" in (
            result.stderr
        ), args
    quiet = runner.invoke(app, ["predict", image, "-m", str(run_folder), "-q", "-f", "jsonl"])
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr
    refused = runner.invoke(app, ["predict", image, "-m", str(run_folder / "state.pt")])
    assert refused.exit_code == 1
    assert refused.stderr.count("\n") == 1 and "not a model" in refused.stderr
    assert "not a ViT config" not in refused.stderr
