"""One writer per `vit train` run folder: a second run is refused at once, a killed run leaves
no stuck lock, and temporary names are unique per process."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_hardening import ENV, TINY_CLI, VIT, folder_of_colours, tiny
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.services.train import read_state, run
from vitcli.services.train import rundir as rundir_module
from vitcli.services.train.rundir import RunFolder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return folder_of_colours(tmp_path_factory.mktemp("data") / "colours")


def hold(folder: Path) -> int:
    """Hold the run folder as a running `vit train` does (another open file description)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_writer_of_a_run_folder_is_refused_at_once(colours, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = hold(out)
    try:
        result = CliRunner().invoke(app, ["train", str(colours), "--out", str(out), *TINY_CLI])
    finally:
        os.close(fd)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "another `vit train` is writing this run folder" in lines[0]
    assert list(out.iterdir()) == []  # nothing written by the refused run


def test_resume_is_refused_while_the_run_is_being_written(colours, tmp_path):
    out = tmp_path / "run"
    run(tiny(colours, out, epochs=1))
    fd = hold(out)
    try:
        result = CliRunner().invoke(app, ["train", "--resume", str(out), "--epochs", "2"])
    finally:
        os.close(fd)
    assert result.exit_code == 1
    assert "another `vit train` is writing" in result.output
    assert read_state(out / "state.pt")["epoch"] == 1


def test_a_killed_holder_leaves_no_stuck_lock(colours, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(Exception, match="another `vit train`"):
            RunFolder(out).lock(create=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    result = run(tiny(colours, out, epochs=1))
    assert result.epochs_done == 1


def test_a_refused_new_run_does_not_leave_an_empty_folder(tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing"), "--out", str(out)])
    assert result.exit_code != 0
    assert not out.exists()


def test_pending_names_are_unique_per_process(colours, tmp_path, monkeypatch):
    seen: list[str] = []
    real = rundir_module.atomic_write_bytes

    def write(path, data, durable=True):
        seen.append(Path(path).name)
        return real(path, data, durable)

    monkeypatch.setattr(rundir_module, "atomic_write_bytes", write)
    run(tiny(colours, tmp_path / "run", epochs=1))
    pending = [name for name in seen if name.endswith(".pending")]
    assert pending and all(f".{os.getpid()}." in name for name in pending)
    assert len(set(pending)) == len(pending)


@pytest.mark.slow
def test_two_real_runs_into_one_folder_one_is_refused_and_the_other_is_whole(colours, tmp_path):
    out = tmp_path / "run"
    command = [*VIT, "train", str(colours), "--out", str(out), *TINY_CLI]
    command += ["--epochs", "2", "--batch-size", "4", "--workers", "0", "-q"]
    processes = [
        subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read().decode()) for p in processes]
    statuses = sorted(status for status, _ in outcomes)
    assert statuses == [0, 1], outcomes
    refused = next(text for status, text in outcomes if status == 1)
    assert "Traceback" not in refused
    assert "another `vit train` is writing" in refused or "already holds a training run" in refused
    assert read_state(out / "state.pt")["epoch"] == 2
    time.sleep(0)  # both processes are gone: the folder resumes (nothing to do) cleanly
    again = subprocess.run(
        [*VIT, "train", "--resume", str(out), "--epochs", "2", "-q"],
        env=ENV,
        capture_output=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr.decode()


class _Runs:
    """Pickles a call: unpickling it would create the file `target` (it must never exist)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickled_state_is_refused_without_unsafe_advice(colours, tmp_path):
    import torch

    out = tmp_path / "run"
    run(tiny(colours, out, epochs=1))
    marker = tmp_path / "ran"
    torch.save(
        {"format": "vitcli-train-state", "epoch": 1, "x": _Runs(str(marker))}, out / "state.pt"
    )
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--epochs", "2"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "holds pickled Python objects" in lines[0]
    assert "weights_only" not in result.output and "trust" not in result.output
    assert not marker.exists()
