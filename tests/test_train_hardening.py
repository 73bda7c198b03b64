"""`vit train` / `vit eval` / `vit data` against hostile options, folders, names and run folders:
a one-line error, never a hang, a traceback, an orphaned worker or an inconsistent run folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.data.folder import scan_image_folder
from vitcli.errors import TrainingError
from vitcli.services.train import TrainConfig, read_state, run
from vitcli.services.train import rundir as rundir_module
from vitcli.services.train.rundir import saved_epoch_of
from vitcli.weights.format import load_vitcli_file

TINY = dict(model="Ti/8", image_size=16, depth=1, width=16, num_heads=2, mlp_dim=32)
TINY_CLI = ["--model", "Ti/8", "--image-size", "16", "--depth", "1", "--width", "16"]
TINY_CLI += ["--heads", "2", "--mlp-dim", "32"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
VIT = [sys.executable, "-m", "vitcli"]


def folder_of_colours(root: Path, per_class: int = 4, classes=("blue", "red")) -> Path:
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
            pixels[5:15, 5:15, index % 3] = 220
            Image.fromarray(pixels).save(root / name / f"{name}{i}.png")
    return root


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), epochs=2, batch_size=4, workers=0, seed=3, **TINY)
    values.update(overrides)
    return TrainConfig(**values)


# Tiny models on a shared 2-core machine: a second OpenMP thread only adds spin-waiting.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return folder_of_colours(tmp_path_factory.mktemp("data") / "colours")


def one_line_error(result, *words: str, status: int = 1) -> None:
    """One `error:` line naming `words`; status 2 for a bad option value (a usage error)."""
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


# -- options ----------------------------------------------------------------------------------
BAD_TRAIN_OPTIONS = [
    (["--mixup", "inf"], "--mixup"),
    (["--cutmix", "inf"], "--cutmix"),
    (["--mixup", "1e308"], "--mixup"),
    (["--mixup", "-1"], "--mixup"),
    (["--warmup-epochs", "nan"], "--warmup-epochs"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--warmup-epochs", "50", "--epochs", "5"], "--warmup-epochs"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--min-lr", "0.5", "--lr", "0.1"], "--min-lr"),
    (["--min-lr", "-1"], "--min-lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--label-smoothing", "nan"], "--label-smoothing"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--image-size", "100000"], "--image-size"),
    (["--image-size", "0"], "--image-size"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "10000000"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "100000000"], "--batch-size"),
    (["--crop-scale", "0"], "--crop-scale"),
    (["--crop-scale", "1.5"], "--crop-scale"),
    (["--val-split", "1"], "--val-split"),
    (["--val-split", "nan"], "--val-split"),
    (["--ema", "1"], "--ema"),
    (["--dropout", "0.95"], "--dropout"),
    (["--drop-path", "inf"], "--drop-path"),
    (["--randaugment", "1000"], "--randaugment"),
    (["--randaugment-magnitude", "11"], "--randaugment-magnitude"),
    (["--beta2", "1"], "--beta2"),
    (["--depth", "100000"], "--depth"),
    (["--width", "0"], "--width"),
    (["--workers", "-1"], "--workers"),
    (["--image-size", "100"], "--image-size"),  # not a multiple of the patch size 16
]


@pytest.mark.parametrize("arguments,flag", BAD_TRAIN_OPTIONS)
def test_every_numeric_train_option_is_checked(colours, tmp_path, arguments, flag):
    result = CliRunner().invoke(
        app, ["train", str(colours), "--out", str(tmp_path / "o"), "-q", *arguments]
    )
    one_line_error(result, flag, status=2)
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.parametrize("value", ["inf", "1e308"])
def test_huge_mixup_is_refused_fast_in_a_real_process(colours, tmp_path, value):
    # A regression here used to hang in random.betavariate: the timeout makes it fail instead.
    done = subprocess.run(
        [*VIT, "train", str(colours), "--out", str(tmp_path / "o"), "--mixup", value, "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert done.returncode == 2 and "--mixup" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "arguments,flag",
    [
        (["eval", "{data}", "--batch-size", "0"], "--batch-size"),
        (["eval", "{data}", "--workers", "-3"], "--workers"),
        (["eval", "{data}", "--device", "tpu"], "device"),
        (["data", "shapes", "{out}", "--per-class", "0"], "--per-class"),
        (["data", "shapes", "{out}", "--image-size", "100000"], "--image-size"),
        (["data", "shapes", "{out}", "--seed", "-1"], "--seed"),
        (["data", "shapes", "{out}", "--workers", "-2"], "--workers"),
    ],
)
def test_eval_and_data_options_are_checked(colours, tmp_path, arguments, flag):
    arguments = [a.format(data=colours, out=tmp_path / "s") for a in arguments]
    one_line_error(CliRunner().invoke(app, arguments), flag, status=2)


@pytest.mark.slow
def test_huge_worker_counts_are_clamped_with_a_warning(colours, tmp_path):
    result = CliRunner().invoke(
        app,
        ["data", "shapes", str(tmp_path / "s"), "--per-class", "1", "--image-size", "32"]
        + ["-w", "64", "-q"],  # the largest count taken; above it is a usage error
    )
    assert result.exit_code == 0, result.output
    assert "--workers 64 is more than the" in result.output
    events = []
    monkey = tiny(colours, tmp_path / "r", epochs=1, workers=64)
    run(monkey, on_progress=events.append, stop_after_epoch=0)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("--workers 64 is more than the" in w for w in warnings), warnings
    start = next(e for e in events if e.kind == "start")
    assert start.metrics["workers"] == len(os.sched_getaffinity(0))
    run(tiny(colours, tmp_path / "m", epochs=1))
    model = tmp_path / "m" / "last.safetensors"
    result = CliRunner().invoke(app, ["eval", str(colours), "-m", str(model), "-w", "64"])
    assert result.exit_code == 0 and "--workers 64 is more than the" in result.output


# -- processes --------------------------------------------------------------------------------
def children_of(pid: int) -> set[int]:
    """Child processes of every thread of `pid` (a thread may end between the listing and the
    read: it has no children then)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.update(int(child) for child in text)
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_a_killed_trainer(colours, tmp_path, kill):
    command = [*VIT, "train", str(colours), "--out", str(tmp_path / "o"), *TINY_CLI]
    command += ["--epochs", "100000", "--batch-size", "2", "--workers", "2", "-q"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no decoding workers within 120 s"
            workers = children_of(process.pid)
            time.sleep(0.05)
        process.send_signal(kill)
        process.wait(timeout=30)
        # torch's own watchdog notices a dead parent only after seconds (5 s polls, and not
        # while a worker is busy); the kernel's death signal is immediate.
        deadline = time.monotonic() + 2.5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)], "orphaned workers survived"
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_shapes_workers_die_with_a_killed_generator(tmp_path):
    command = [*VIT, "data", "shapes", str(tmp_path / "s"), "--per-class", "100000", "-w", "2"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no drawing processes within 120 s"
            workers = children_of(process.pid)
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 2.5
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)], "orphaned workers survived"
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_ctrl_c_says_which_epoch_is_saved_and_how_to_resume(colours, tmp_path):
    out = tmp_path / "o"
    command = [*VIT, "train", str(colours), "--out", str(out), *TINY_CLI]
    command += ["--epochs", "100000", "--batch-size", "2", "--workers", "0", "-q"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "state.pt").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    text = stderr.decode()
    assert "Traceback" not in text
    epoch = read_state(out / "state.pt")["epoch"]
    assert f"interrupted: epoch {epoch} is saved in {out}" in text
    assert f"vit train --resume {out} --epochs 100000" in text


# -- the run folder ---------------------------------------------------------------------------
def fail_on(monkeypatch, name: str, epoch_file: Path | None = None, kind: str = "write") -> None:
    """Make writing (or renaming onto) `name` in a run folder fail as a full disk would."""
    if kind == "write":
        real = rundir_module.atomic_write_bytes

        def write(path, data, durable=True):
            if Path(path).name.startswith(f".{name}.") and str(path).endswith(".pending"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, data, durable)

        monkeypatch.setattr(rundir_module, "atomic_write_bytes", write)
    else:
        real_replace = os.replace

        def replace(source, target):
            if Path(target).name == name:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
            return real_replace(source, target)

        monkeypatch.setattr(rundir_module.os, "replace", replace)


def pending_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith((".pending", ".tmp"))]


def test_disk_full_between_the_weights_and_the_state_keeps_the_folder_consistent(
    colours, tmp_path, monkeypatch
):
    out = tmp_path / "o"
    run(tiny(colours, out, epochs=1))
    fail_on(monkeypatch, "state.pt")
    with pytest.raises(TrainingError) as caught:
        run(TrainConfig(resume=str(out), epochs=3))
    message = str(caught.value)
    assert (
        "\n" not in message and "epoch 2" in message and "epoch 1 is the last one saved" in message
    )
    assert "No space left" in message and f"vit train --resume {out}" in message
    assert pending_files(out) == []
    assert read_state(out / "state.pt")["epoch"] == 1
    assert saved_epoch_of(out / "last.safetensors") == 1
    assert saved_epoch_of(out / "best.safetensors") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    assert run(TrainConfig(resume=str(out), epochs=2)).history[-1]["epoch"] == 2


def test_folder_turned_read_only_between_renames_is_reconciled_on_resume(
    colours, tmp_path, monkeypatch
):
    out, reference = tmp_path / "o", tmp_path / "ref"
    run(tiny(colours, reference, epochs=2))
    run(tiny(colours, out, epochs=2), stop_after_epoch=1)
    fail_on(monkeypatch, "state.pt", kind="rename")  # last.safetensors already renamed
    with pytest.raises(TrainingError, match="Read-only"):
        run(TrainConfig(resume=str(out), epochs=2))
    assert pending_files(out) == []
    assert read_state(out / "state.pt")["epoch"] == 1
    assert saved_epoch_of(out / "last.safetensors") == 2  # one epoch ahead: state.pt rules
    monkeypatch.undo()
    events = []
    run(TrainConfig(resume=str(out), epochs=2), on_progress=events.append, stop_after_epoch=1)
    notes = next(e for e in events if e.kind == "start").metrics["notes"]
    assert any("last.safetensors rewritten from state.pt (epoch 1)" in n for n in notes)
    assert saved_epoch_of(out / "last.safetensors") == 1
    state = read_state(out / "state.pt")
    last = load_vitcli_file(out / "last.safetensors").model.state_dict()
    assert all(torch.equal(last[k], state["model"][k]) for k in last)
    run(TrainConfig(resume=str(out), epochs=2))  # the replayed epoch 2 is the uninterrupted one
    a, b = read_state(out / "state.pt"), read_state(reference / "state.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def finished_run(colours, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    run(tiny(colours, out, epochs=1))
    return out


@pytest.mark.parametrize(
    "damage,words",
    [
        ("config_list", ["config.json", "not a training configuration"]),
        ("config_empty", ["config.json", "missing"]),
        ("config_wrong_type", ["config.json", "'epochs'", "wrong type"]),
        ("config_nan_lr", ["config.json", "--lr"]),
        ("config_not_json", ["config.json", "unreadable"]),
        ("config_missing", ["config.json", "missing"]),
        ("state_truncated", ["state.pt", "unreadable training state"]),
        ("state_missing", ["state.pt", "before its first epoch ended"]),
        ("state_list", ["state.pt", "not a vitcli training state"]),
        ("state_bad_epoch", ["state.pt", "damaged training state"]),
        ("state_wrong_model", ["state.pt", "does not match the run's model"]),
        ("model_config_huge", ["config.json", "model_config"]),
    ],
)
def test_damaged_run_folders_give_one_line_errors(finished_run, tmp_path, damage, words):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    config_path, state_path = out / "config.json", out / "state.pt"
    config = json.loads(config_path.read_text())
    if damage == "config_list":
        config_path.write_text("[]")
    elif damage == "config_empty":
        config_path.write_text("{}")
    elif damage == "config_wrong_type":
        config_path.write_text(json.dumps({**config, "epochs": "ten"}))
    elif damage == "config_nan_lr":
        config_path.write_text(json.dumps({**config, "lr": float("nan")}))
    elif damage == "config_not_json":
        config_path.write_bytes(b"{\xff")
    elif damage == "config_missing":
        config_path.unlink()
    elif damage == "state_truncated":
        state_path.write_bytes(state_path.read_bytes()[:1000])
    elif damage == "state_missing":
        state_path.unlink()
    elif damage == "state_list":
        torch.save([1, 2], state_path)
    elif damage == "state_bad_epoch":
        state = torch.load(state_path, weights_only=True)
        torch.save({**state, "epoch": "one"}, state_path)
    elif damage == "state_wrong_model":
        state = torch.load(state_path, weights_only=True)
        torch.save({**state, "model": {"nothing": torch.zeros(1)}}, state_path)
    elif damage == "model_config_huge":
        config["model_config"]["width"] = 10**9
        config_path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--epochs", "2", "-q"])
    one_line_error(result, *words)


def test_resuming_a_finished_run_says_there_is_nothing_to_do(finished_run):
    result = CliRunner().invoke(app, ["train", "--resume", str(finished_run), "-q"])
    assert result.exit_code == 0, result.output
    assert "nothing left to do" in result.output and "larger --epochs" in result.output
    assert result.output.strip().splitlines()[-1] == str(finished_run / "best.safetensors")


# -- hostile folders and names ----------------------------------------------------------------
def test_fifos_sockets_and_link_loops_in_a_training_folder(tmp_path):
    root = folder_of_colours(tmp_path / "d", per_class=2)
    os.mkfifo(root / "red" / "pipe.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "blue" / "sock.jpg"))
    (root / "red" / "loop").symlink_to("..")  # red/loop/red/loop/... would never end
    (root / "blue" / "self").symlink_to(".")
    try:
        data = scan_image_folder(root)  # returns at all: nothing was opened, no loop followed
    finally:
        server.close()
    assert data.counts() == [2, 2], data.samples
    assert len(data.skipped) == 2 and all("not a regular file" in m for m in data.skipped)
    events = []
    run(tiny(root, tmp_path / "o", epochs=1), on_progress=events.append)
    warnings = " ".join(e.message for e in events if e.kind == "warning")
    assert "pipe.png: not a regular file" in warnings


def test_non_utf8_names_in_training_and_eval_are_kept_losslessly(tmp_path):
    root = folder_of_colours(tmp_path / os.fsdecode(b"d\xff"), per_class=3)
    (root / "red").rename(root / os.fsdecode(b"gr\xffy"))
    bad_file = root / "blue" / os.fsdecode(b"bad\xfe.png")
    bad_file.write_bytes(b"not an image")
    events = []
    out = tmp_path / "run"
    run(tiny(root, out, epochs=1), on_progress=events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "bad" in warnings[0]
    saved = json.loads((out / "config.json").read_bytes())  # valid UTF-8 JSON
    assert os.fsencode(saved["data"]) == os.fsencode(str(root.resolve()))  # the exact bytes
    assert load_vitcli_file(out / "last.safetensors").labels == ["blue", "gr\\xffy"]
    report, table = tmp_path / "report.json", tmp_path / "report.csv"
    for path in (report, table):
        result = CliRunner().invoke(
            app,
            ["eval", str(root), "-m", str(out / "last.safetensors"), "-o", str(path), "-w", "0"],
        )
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "gr\\xffy" in result.output and "d\\xff" in result.output
    failures = json.loads(report.read_bytes())["failures"]
    assert len(failures) == 1 and os.fsencode(str(bad_file)) in os.fsencode(failures[0])
    assert "gr\\\\xffy" in table.read_text(encoding="utf-8")  # the label's \\ doubled


def test_eval_fails_when_images_fail_and_a_dead_class_is_an_error(tmp_path, colours):
    from vitcli.model import ViT, ViTConfig
    from vitcli.weights.format import save_model

    root = folder_of_colours(tmp_path / "d", per_class=2, classes=("blue", "red", "black"))
    for path in (root / "black").iterdir():
        path.write_bytes(b"broken")
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=8, num_classes=3, width=16, depth=1,
                          num_heads=2, mlp_dim=32))  # fmt: skip
    path = save_model(model, tmp_path / "m.safetensors", labels=["black", "blue", "red"])
    report, png = tmp_path / "r.json", tmp_path / "c.png"
    result = CliRunner().invoke(
        app,
        ["eval", str(root), "--model", str(path), "-o", str(report), "--confusion-png", str(png)]
        + ["-w", "0", "-q"],
    )
    assert result.exit_code == 1, result.output
    assert "class black: none of its images could be decoded" in result.output
    assert "2 images could not be decoded" in result.output
    assert f"wrote {report}" in result.output and f"wrote {png}" in result.output
    per_class = {c["label"]: c for c in json.loads(report.read_text())["per_class"]}
    assert per_class["black"]["accuracy"] is None and per_class["black"]["failed"] == 2
    clean = CliRunner().invoke(app, ["eval", str(colours), "--model", str(path), "-w", "0", "-q"])
    assert clean.exit_code == 0 and "error" not in clean.output, clean.output


def test_run_folders_of_earlier_versions_still_resume(finished_run, tmp_path):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(finished_run, out)
    config = json.loads((out / "config.json").read_text())
    config.update(val=None, image_size=None)  # how runs recorded them before
    del config["source"]
    (out / "config.json").write_text(json.dumps(config))
    result = run(TrainConfig(resume=str(out), epochs=2))
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_eval_csv_neither_splits_rows_nor_carries_formulas(tmp_path):
    import csv

    from vitcli.model import ViT, ViTConfig
    from vitcli.weights.format import save_model

    labels = ["=HYPERLINK(1)", "a\rb"]
    root = folder_of_colours(tmp_path / "d", per_class=1, classes=tuple(labels))
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=8, num_classes=2, width=16, depth=1,
                          num_heads=2, mlp_dim=32))  # fmt: skip
    path = save_model(model, tmp_path / "m.safetensors", labels=labels)
    report = tmp_path / "r.csv"
    result = CliRunner().invoke(
        app, ["eval", str(root), "-m", str(path), "-o", str(report), "-w", "0", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert report.read_bytes().count(b"\n") == 4 and b"\r" not in report.read_bytes()
    with open(report, newline="") as handle:
        cells = [row[0] for row in csv.reader(handle)]
    assert cells == ["class", "'=HYPERLINK(1)", "a\\u000db", "(all)"]
