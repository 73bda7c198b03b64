"""`vit train` / `vit eval`: learning, checkpoints, resume, kill, DDP, bad layouts, NaN, eval."""

from __future__ import annotations

import csv
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
from vitcli.data.folder import scan_image_folder, stratified_split
from vitcli.errors import DatasetError, TrainingError
from vitcli.model import ViT, ViTConfig
from vitcli.services.train import TrainConfig, lr_at, make_optimizer, read_state, run
from vitcli.services.train import loop as train_loop
from vitcli.weights.format import load_vitcli_file, save_model

CLASSES = ("red", "green", "blue")
LABELS = sorted(CLASSES)  # folder classes come back in natural order
TINY = dict(model="Ti/8", image_size=32, depth=2, width=32, num_heads=2, mlp_dim=64)
TINY_CLI = [
    "--model",
    "Ti/8",
    "--image-size",
    "32",
    "--depth",
    "2",
    "--width",
    "32",
    "--heads",
    "2",
    "--mlp-dim",
    "64",
]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def colour_folder(
    root: Path, per_class: int = 12, size: int = 40, seed: int = 0, classes=CLASSES
) -> Path:
    """Images of one bright coloured square (class = colour channel) on dark noise."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 70, (size, size, 3), dtype=np.uint8)
            side = int(rng.integers(size // 3, size // 2))
            top, left = rng.integers(0, size - side, 2)
            pixels[top : top + side, left : left + side] = 30
            pixels[top : top + side, left : left + side, index % 3] = 230
            Image.fromarray(pixels).save(root / name / f"{name}{i}.png")
    return root


# Tiny models on a shared 2-core machine: a second OpenMP thread only adds spin-waiting.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("data") / "colours")


def config(data: Path, out: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data), out=str(out), epochs=3, batch_size=8, lr=3e-3, workers=0, seed=1, **TINY
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def tiny_model_file(path: Path, labels, image_size: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = ViT(
        ViTConfig(
            image_size=image_size,
            patch_size=8,
            num_classes=len(labels),
            width=32,
            depth=2,
            num_heads=2,
            mlp_dim=64,
        )
    )
    save_model(model, path, labels=list(labels))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- learning ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = ViT(
        ViTConfig(
            image_size=16, patch_size=8, num_classes=4, width=32, depth=2, num_heads=2, mlp_dim=64
        )
    )
    optimizer = make_optimizer(model, lr=3e-3, weight_decay=0.0)
    pixels, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    assert (model(pixels).argmax(1) == labels).all()


@pytest.mark.slow
def test_training_beats_chance_and_writes_a_usable_run(colours, tmp_path):
    out = tmp_path / "run"
    events = []
    result = run(
        config(colours, out, epochs=8, batch_size=4, val_split=0.25), on_progress=events.append
    )
    val_top1 = [row["val_top1"] for row in result.history]
    assert max(val_top1) >= 0.85, val_top1  # chance is 1/3
    assert result.best_metric == max(val_top1) and result.best_metric_name == "val_top1"
    assert {e.kind for e in events} >= {"start", "step", "epoch"}
    # best.safetensors is a normal model file: labels, preprocessing, the best epoch's accuracy.
    bundle = load_vitcli_file(out / "best.safetensors")
    assert bundle.labels == LABELS
    assert bundle.preprocess.size == (32, 32) and bundle.preprocess.resize == "squash"
    assert bundle.config.depth == 2 and bundle.config.image_size == (32, 32)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    with open(out / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert float(table[-1]["val_top1"]) == pytest.approx(rows[-1]["val_top1"])
    assert {"train_loss", "val_loss", "val_top5", "lr", "images_per_s"} <= set(table[0])
    saved = json.loads((out / "config.json").read_text())
    assert saved["classes"] == LABELS and saved["lr"] == 3e-3 and saved["mode"] == "scratch"
    # The resume state is plain data: weights_only loading works and knows where it stopped.
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 8 and state["step"] == rows[-1]["step"]
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["optimizer"]["state"]


def test_weight_decay_groups_and_schedule():
    model = ViT(
        ViTConfig(
            image_size=16, patch_size=8, num_classes=3, width=32, depth=1, num_heads=2, mlp_dim=64
        )
    )
    decay, no_decay = make_optimizer(model, lr=1e-3, weight_decay=0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "pos_embed",
        "cls_token",
        "norm.weight",
        "head.bias",
        "blocks.0.attn.qkv.bias",
    }
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert lr_at(0, 1.0, 10, 110, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 110, 0.0) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110, 0.0) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 10, 110, 0.01) == pytest.approx(0.01)


# -- resume -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_bitwise_identical(colours, tmp_path):
    # Every RNG consumer on: augmentation, mixup/cutmix, dropout, drop-path, EMA.
    extra = dict(
        epochs=4,
        randaugment=2,
        mixup=0.8,
        cutmix=1.0,
        dropout=0.1,
        drop_path=0.1,
        ema=0.9,
        val_split=0.25,
    )
    full = run(config(colours, tmp_path / "full", **extra))
    first = run(config(colours, tmp_path / "cut", **extra), stop_after_epoch=2)
    assert first.stopped_early and read_state(tmp_path / "cut" / "state.pt")["epoch"] == 2
    # Resumed with another number of decoding workers: samples do not depend on who decodes them.
    resumed = run(TrainConfig(resume=str(tmp_path / "cut"), workers=2))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    a, b = read_state(tmp_path / "full" / "state.pt"), read_state(tmp_path / "cut" / "state.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert torch.equal(a["ema"][name], b["ema"][name]), name
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    last_a = load_vitcli_file(tmp_path / "full" / "last.safetensors").model.state_dict()
    last_b = load_vitcli_file(tmp_path / "cut" / "last.safetensors").model.state_dict()
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    assert full.history[-1]["val_loss"] == resumed.history[-1]["val_loss"]


@pytest.mark.slow
def test_kill_mid_run_leaves_a_readable_checkpoint_and_resume_finishes(colours, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "vitcli",
        "train",
        str(colours),
        "--out",
        str(out),
        *TINY_CLI,
        "--epochs",
        "200",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--quiet",
    ]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a liveness bound for a loaded machine, not a timing
        while not (out / "state.pt").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside a later epoch, maybe mid-write
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    done = read_state(out / "state.pt")["epoch"]
    assert 1 <= done < 200
    assert load_vitcli_file(out / "last.safetensors").labels == LABELS
    finish = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcli",
            "train",
            "--resume",
            str(out),
            "--epochs",
            str(done + 1),
            "--quiet",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finish.returncode == 0, finish.stderr
    assert f"epoch {done + 1}/{done + 1}" in finish.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, done + 2))
    assert read_state(out / "state.pt")["epoch"] == done + 1


@pytest.mark.slow
def test_two_process_ddp_with_gloo(colours, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "vitcli",
        "train",
        str(colours),
        "--out",
        str(out),
        *TINY_CLI,
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--workers",
        "0",
        "--val-split",
        "0.25",
        "--quiet",
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [str(out / "best.safetensors")]  # rank 0 only
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["world_size"] == 2
    # Metrics are sums over both ranks: 27 training images padded to 2 x 14 by the
    # DistributedSampler, batches of 6 -> 3 steps per rank; the 9 val images counted once.
    assert saved["train_images"] == 27 and rows[0]["train_images"] == 28
    assert saved["val_images"] == 9 and saved["steps_per_epoch"] == 3
    assert 0.0 <= rows[-1]["val_top1"] <= 1.0 and round(rows[-1]["val_top1"] * 9, 6) == int(
        round(rows[-1]["val_top1"] * 9)
    )
    assert load_vitcli_file(out / "last.safetensors").labels == LABELS


# -- failures ---------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(colours, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train_loop.lr_at
    steps_per_epoch = 5  # 36 images, batch 8

    def exploding(step, *args):  # a learning rate that blows up during epoch 2
        return 1e30 if step >= steps_per_epoch + 1 else real(step, *args)

    monkeypatch.setattr(train_loop, "lr_at", exploding)
    with pytest.raises(TrainingError, match=r"NaN.*epoch 2.*last good checkpoint \(epoch 1\)"):
        run(config(colours, out, epochs=3, grad_clip=0.0))
    assert read_state(out / "state.pt")["epoch"] == 1
    bundle = load_vitcli_file(out / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in bundle.model.state_dict().values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_nan_from_the_first_step_is_a_clear_cli_error(colours, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(colours),
            "--out",
            str(tmp_path / "r"),
            *TINY_CLI,
            "--lr",
            "1e30",
            "--grad-clip",
            "0",
            "--warmup-epochs",
            "0",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == 1
    assert (
        "NaN" in result.output
        and "lower --lr" in result.output
        and "Traceback" not in result.output
    )


@pytest.mark.parametrize(
    "layout,message",
    [
        ("missing", "no such folder"),
        ("empty", "empty folder"),
        ("loose", "directly in the folder"),
        ("one_class", "only one class"),
        ("no_images", "no images in any class"),
        ("one_empty_class", "contain no images"),
    ],
)
def test_bad_dataset_layouts_give_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    image = Image.new("RGB", (8, 8), "red")
    if layout == "loose":
        image.save(root / "a.png")
    elif layout == "one_class":
        (root / "cat").mkdir()
        image.save(root / "cat" / "1.png")
    elif layout == "no_images":
        for name in ("cat", "dog"):
            (root / name).mkdir()
            (root / name / "notes.txt").write_text("x")
    elif layout == "one_empty_class":
        for name in ("cat", "dog"):
            (root / name).mkdir()
        image.save(root / "cat" / "1.png")
    with pytest.raises(DatasetError, match=message):
        scan_image_folder(root)
    result = CliRunner().invoke(app, ["train", str(root), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 1 and message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_folder_order_split_and_unknown_val_classes(tmp_path):
    root = colour_folder(tmp_path / "d", per_class=10, classes=("class10", "class2", "class1"))
    (root / ".masks" / "x").mkdir(parents=True)  # hidden folders are not classes
    (root / "class2" / "deeper").mkdir()
    Image.new("RGB", (8, 8)).save(root / "class2" / "deeper" / "nested.png")  # found recursively
    data = scan_image_folder(root)
    assert data.classes == ["class1", "class2", "class10"] and data.counts() == [10, 11, 10]
    train_part, val_part = stratified_split(data, 0.2, seed=3)
    assert val_part.counts() == [2, 2, 2] and train_part.counts() == [8, 9, 8]
    assert stratified_split(data, 0.2, seed=3)[1].samples == val_part.samples  # seeded
    assert stratified_split(data, 0.2, seed=4)[1].samples != val_part.samples
    other = colour_folder(tmp_path / "v", per_class=1, classes=("class1", "zebra"))
    with pytest.raises(DatasetError, match="zebra"):
        run(TrainConfig(data=str(root), out=str(tmp_path / "o"), val=str(other), workers=0, **TINY))


def test_bad_images_are_reported_once_and_skipped(tmp_path):
    root = colour_folder(tmp_path / "d", per_class=6)
    (root / "red" / "broken.png").write_bytes(b"not a png at all")
    events = []
    result = run(config(root, tmp_path / "o", epochs=2, batch_size=4), on_progress=events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert len(warnings) == 1 and "broken.png" in warnings[0]
    assert [r["skipped_images"] for r in result.history] == [1, 1]
    assert [r["train_images"] for r in result.history] == [18, 18]


def test_existing_run_and_resume_mistakes(colours, tmp_path):
    out = tmp_path / "o"
    run(config(colours, out, epochs=2))
    with pytest.raises(TrainingError, match="--resume"):
        run(config(colours, out, epochs=1))
    with pytest.raises(TrainingError, match="larger --epochs"):
        run(TrainConfig(resume=str(out), epochs=1))
    with pytest.raises(TrainingError, match="no such run folder"):
        run(TrainConfig(resume=str(tmp_path / "nothing")))
    # Options given with --resume that differ from the run's are named, not silently dropped.
    result = CliRunner().invoke(
        app, ["train", "--resume", str(out), "--epochs", "3", "--lr", "1", *TINY_CLI, "-q"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "ignored with --resume" in result.output
        and "--lr" in result.output
        and "--depth" not in result.output
    )
    assert read_state(out / "state.pt")["epoch"] == 3
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(TrainingError, match="before its first epoch ended"):
        run(TrainConfig(resume=str(tmp_path / "half")))


# -- fine-tuning ------------------------------------------------------------------------------
def test_fine_tune_replaces_head_and_resamples_position_embedding(colours, tmp_path):
    source = tiny_model_file(tmp_path / "src.safetensors", ["a", "b", "c", "d", "e"], image_size=32)
    events = []
    run(
        config(
            colours,
            tmp_path / "ft",
            model=str(source),
            image_size=48,
            epochs=1,
            lr=None,
            depth=None,
            width=None,
            num_heads=None,
            mlp_dim=None,
        ),
        on_progress=events.append,
    )
    start = next(e for e in events if e.kind == "start").metrics
    assert start["mode"] == "finetune" and any("head replaced" in n for n in start["notes"])
    assert any("resampled to 48x48" in n for n in start["notes"])
    bundle = load_vitcli_file(tmp_path / "ft" / "last.safetensors")
    assert bundle.labels == LABELS and bundle.config.image_size == (48, 48)
    assert bundle.model.pos_embed.shape == (1, 1 + 36, 32) and bundle.preprocess.size == (48, 48)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["lr"] == 1e-4 and saved["mode"] == "finetune"  # the fine-tune default
    with pytest.raises(Exception, match="only applies when training from scratch"):
        run(config(colours, tmp_path / "ft2", model=str(source), epochs=1))


# -- eval -------------------------------------------------------------------------------------
def test_eval_writes_json_csv_and_png_with_known_numbers(colours, tmp_path):
    path = tiny_model_file(tmp_path / "m.safetensors", ["blue", "red", "green", "black"])
    bundle = load_vitcli_file(path)
    with torch.no_grad():  # a model that always answers "red", then "green", then "blue"
        bundle.model.head.bias.copy_(torch.tensor([1.0, 3.0, 2.0, -5.0]))
    save_model(bundle, path)
    runner = CliRunner()
    for name in ("e.json", "e.csv"):
        result = runner.invoke(
            app,
            [
                "eval",
                str(colours),
                "--model",
                str(path),
                "-o",
                str(tmp_path / name),
                "--confusion-png",
                str(tmp_path / "c.png"),
                "--workers",
                "0",
                "-q",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "top-1 0.3333" in result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert (
        report["top1"] == pytest.approx(1 / 3) and report["top5"] == 1.0 and report["images"] == 36
    )
    per_class = {c["label"]: c["accuracy"] for c in report["per_class"]}
    assert per_class == {"red": 1.0, "green": 0.0, "blue": 0.0}
    assert report["confusion"]["columns"] == ["blue", "green", "red", "(other)"]
    assert report["confusion"]["matrix"] == [[0, 0, 12, 0]] * 3
    with open(tmp_path / "e.csv", newline="") as handle:
        rows = {row["class"]: row for row in csv.DictReader(handle)}
    assert (
        float(rows["(all)"]["accuracy"]) == pytest.approx(1 / 3) and rows["red"]["correct"] == "12"
    )
    assert Image.open(tmp_path / "c.png").size[0] > 100
    table = runner.invoke(app, ["eval", str(colours), "--model", str(path), "--workers", "0"])
    assert table.exit_code == 0 and "confusion" in table.output


def test_eval_rejects_classes_the_model_does_not_know(colours, tmp_path):
    path = tiny_model_file(tmp_path / "m.safetensors", ["cat", "dog"])
    result = CliRunner().invoke(app, ["eval", str(colours), "--model", str(path), "--workers", "0"])
    assert result.exit_code == 1 and "not labels of the model" in result.output


# -- augmentation -----------------------------------------------------------------------------
def test_augmentation_is_a_function_of_its_rng():
    import random

    from vitcli.data.augment import RAND_OPS, TrainTransform, mix_batch
    from vitcli.data.preprocess import Preprocess

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    for name, op in RAND_OPS.items():
        for magnitude in (0.0, 1.0):
            out = op(image, magnitude, random.Random(0))
            assert out.size == image.size and out.mode == "RGB", name
    transform = TrainTransform(Preprocess(size=32), randaugment_ops=3)
    first = transform(image, random.Random("1:2:3"))
    assert first.shape == (3, 32, 32) and first.dtype == np.uint8
    assert np.array_equal(first, transform(image, random.Random("1:2:3")))
    assert not np.array_equal(first, transform(image, random.Random("1:2:4")))
    pixels, targets = torch.randn(4, 3, 8, 8), torch.eye(4)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixed, soft = mix_batch(pixels, targets, mixup, cutmix, random.Random(5))
        assert mixed.shape == pixels.shape and torch.allclose(soft.sum(1), torch.ones(4))
        assert not torch.equal(mixed, pixels)


# -- one normalisation ------------------------------------------------------------------------
def test_training_and_eval_inputs_are_the_documented_normalisation_of_real_images(
    tmp_path, monkeypatch, examples_dir
):
    """Workers send uint8; the model sees (x / 255 - mean) / std, computed on the device by
    data.loader.normalize, bit for bit what the preprocessing documents."""
    import shutil

    from vitcli.data.folder import scan_image_folder
    from vitcli.data.labelled import FolderDataset
    from vitcli.data.loader import normalize
    from vitcli.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    root = tmp_path / "d"
    for name, image in (("ring", "shapes-ring.jpg"), ("star", "shapes-star.jpg")):
        (root / name).mkdir(parents=True)
        shutil.copy(examples_dir / image, root / name / image)
    data = scan_image_folder(root)

    def documented(array: np.ndarray, mean, std) -> torch.Tensor:
        x = array.astype(np.float32) * np.float32(1 / 255)
        x = (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[
            :, None, None
        ]
        return torch.from_numpy(x)

    # Evaluation / validation: resize only, then ImageNet mean/std.
    preprocess = Preprocess(size=48, resize="shorter", crop_pct=0.875, interpolation="bicubic",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip
    _, array, _, error = FolderDataset(data, preprocess)[0]
    assert error is None and array.dtype == np.uint8 and array.shape == (3, 48, 48)
    expected = documented(array, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(normalize(torch.from_numpy(array)[None], preprocess)[0], expected)

    # Training: what train_step receives is the normalised augmented crop of the worker's uint8.
    seen = []
    real_step = train_loop.train_step

    def spy(net, model, optimizer, pixels, targets, **options):
        seen.append(pixels.detach().clone())
        return real_step(net, model, optimizer, pixels, targets, **options)

    monkeypatch.setattr(train_loop, "train_step", spy)
    options = config(root, tmp_path / "run", epochs=1, batch_size=1, hflip=False, seed=5)
    run(options)
    from vitcli.data.augment import TrainTransform

    scratch = Preprocess(size=32, resize="squash", interpolation="bilinear")  # mean/std 0.5
    transform = TrainTransform(scratch, scale=(0.35, 1.0), hflip=False)
    dataset = FolderDataset(data, transform, seed=5)
    crops = [dataset[(index, 0)][1] for index in range(len(dataset))]
    assert crops[0].dtype == np.uint8
    wanted = [documented(crop, (0.5,) * 3, (0.5,) * 3) for crop in crops]
    assert len(seen) == 2
    for pixels in seen:
        assert any(torch.equal(pixels[0], w) for w in wanted)
