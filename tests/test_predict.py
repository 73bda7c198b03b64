"""`vit predict` end to end: real files, real subprocesses, every output format parsed back."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import CASES, photo, write_cases
from typer.testing import CliRunner

from vitcli import distributed
from vitcli.cli import app
from vitcli.data.inputs import InputItem
from vitcli.errors import InputError
from vitcli.model import ViT, ViTConfig
from vitcli.runtime import resolve_device, resolve_dtype
from vitcli.services.outputs import open_writer
from vitcli.services.predict import PredictOptions, PredictRun, predict_paths
from vitcli.weights.format import save_model
from vitcli.weights.resolve import load_model

LABELS = ["cat", "dog", "bird", "fish", "frog"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny random ViT whose head is not zero, so that different images score differently."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, num_classes=5, width=32, depth=2, num_heads=4, mlp_dim=64
    )
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors", labels=LABELS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Every robustness case, plus a few good photos in a nested folder and a non-image file."""
    root = tmp_path_factory.mktemp("photos")
    write_cases(root / "cases")
    for i in (1, 2, 10):
        Image.fromarray(photo(40, 30, seed=i)).save(root / f"img{i}.png")
    (root / "notes.txt").write_text("not an image; a folder scan skips me")
    return root


def run_cli(
    *args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m vitcli ...` as a user runs it (stdout and stderr are pipes, not terminals)."""
    return subprocess.run(
        [sys.executable, "-m", "vitcli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def by_name(records: list[dict]) -> dict[str, dict]:
    return {Path(record["path"]).name: record for record in records}


def check_record(record: dict, top_k: int) -> None:
    if "error" in record:
        assert set(record) == {"path", "error"} and record["error"]
        return
    assert set(record) == {"path", "predictions"} and len(record["predictions"]) == top_k
    for prediction in record["predictions"]:
        assert set(prediction) == {"label", "index", "score"}
        assert prediction["label"] == LABELS[prediction["index"]]
    scores = [p["score"] for p in record["predictions"]]
    assert scores == sorted(scores, reverse=True)


# -- the whole robustness folder through a real subprocess -------------------------------------


def test_folder_of_awkward_files_is_classified_in_natural_order_and_failures_recorded(
    folder, model_file
):
    result = run_cli(
        "predict", str(folder), "--model", str(model_file), "--batch-size", "4", "--workers", "2"
    )
    assert result.returncode == 1, result.stderr  # some inputs failed ...
    records = jsonl(result.stdout)  # ... piped stdout: JSON lines by default
    names = [Path(r["path"]).relative_to(folder).as_posix() for r in records]
    expected_cases = sorted(
        CASES,
        key=lambda n: [
            (0, int(p), "") if p.isdigit() else (1, 0, p)
            for p in __import__("re").split(r"(\d+)", n)
        ],
    )
    assert names == [f"cases/{n}" for n in expected_cases] + ["img1.png", "img2.png", "img10.png"]
    found = by_name(records)
    for name, expected_error in CASES.items():
        check_record(found[name], top_k=5)
        if expected_error is None:
            assert "predictions" in found[name], found[name]
        else:
            assert expected_error in found[name]["error"]
    failed = sum(error is not None for error in CASES.values())
    summary = result.stderr.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith(
        f"{len(records) - failed} of {len(records)} images classified, {failed} failed"
    )


def test_viewer_semantics_reach_the_model(folder, model_file, tmp_path):
    """EXIF rotation and first GIF frame are what the model sees: identical logits to a plain
    PNG of the upright picture / of frame 0, and different from the unrotated / frame 1."""
    cases = folder / "cases"
    with Image.open(cases / "exif_rotated.jpg") as raw:
        stored = raw.convert("RGB")
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    stored.save(tmp_path / "unrotated.png")
    with Image.open(cases / "animated.gif") as gif:
        gif.convert("RGB").save(tmp_path / "frame0.png")
        gif.seek(1)
        gif.convert("RGB").save(tmp_path / "frame1.png")
    names = ["upright.png", "unrotated.png", "frame0.png", "frame1.png"]
    items = [InputItem(str(cases / "exif_rotated.jpg")), InputItem(str(cases / "animated.gif"))]
    items += [InputItem(str(tmp_path / n)) for n in names]
    bundle = load_model(model_file)
    records = list(predict_paths(bundle, items, PredictOptions(logits=True, workers=0)))
    logits = [
        np.array([p["score"] for p in sorted(r["predictions"], key=lambda p: p["index"])])
        for r in records
    ]

    def same(a, b):  # equal pixels; only batch-position rounding differs
        return np.abs(a - b).max() < 1e-5

    assert (
        same(logits[0], logits[2]) and np.abs(logits[0] - logits[3]).max() > 1e-3
    )  # EXIF: upright, not as stored
    assert (
        same(logits[1], logits[4]) and np.abs(logits[1] - logits[5]).max() > 1e-3
    )  # GIF: frame 0, not frame 1


# -- formats ------------------------------------------------------------------------------------


def test_every_format_parses_back_to_the_same_records(folder, model_file, tmp_path):
    runner = CliRunner()
    inputs = [
        str(folder / "img1.png"),
        str(folder / "cases" / "zero.jpg"),
        str(folder / "img2.png"),
    ]
    common = ["predict", *inputs, "--model", str(model_file), "--top-k", "3", "--workers", "0"]
    results = {}
    for fmt in ("json", "jsonl", "csv"):
        target = tmp_path / f"out.{fmt}"
        result = runner.invoke(app, [*common, "--format", fmt, "--output", str(target)])
        assert result.exit_code == 1, result.output
        results[fmt] = target.read_text()
        assert not list(tmp_path.glob(".out.*")), "temporary files left behind"
    from_json = json.loads(results["json"])
    from_jsonl = jsonl(results["jsonl"])
    assert from_json == from_jsonl and [r["path"] for r in from_json] == inputs
    for record in from_json:
        check_record(record, top_k=3)
    rows = list(csv.DictReader(io.StringIO(results["csv"])))
    assert list(rows[0]) == [
        "path",
        "label_1",
        "score_1",
        "label_2",
        "score_2",
        "label_3",
        "score_3",
        "error",
    ]
    for row, record in zip(rows, from_json, strict=True):
        assert row["path"] == record["path"]
        if "error" in record:
            # The path has its own column; the error cell is the reason alone.
            assert record["error"].startswith(f"{record['path']}: ")
            assert row["error"] == record["error"].removeprefix(f"{record['path']}: ")
            assert row["label_1"] == row["score_1"] == ""
        else:
            assert row["error"] == ""
            for k, prediction in enumerate(record["predictions"], start=1):
                assert (
                    row[f"label_{k}"] == prediction["label"]
                    and float(row[f"score_{k}"]) == prediction["score"]
                )
    # The format follows the --output suffix when --format is not given.
    result = runner.invoke(app, [*common, "--output", str(tmp_path / "guess.csv")])
    assert (tmp_path / "guess.csv").read_text() == results["csv"]


def test_table_format_and_its_misuse(folder, model_file, tmp_path):
    args = [
        "predict",
        str(folder / "img1.png"),
        str(folder / "cases" / "text.jpg"),
        "--model",
        str(model_file),
        "--workers",
        "0",
    ]
    result = run_cli(*args, "--format", "table", "--top-k", "3", env={"COLUMNS": "200"})
    assert result.returncode == 1
    header, rule, good, bad = result.stdout.splitlines()
    assert header.split() == ["image", "prediction", "score", "next", "/", "error"] and set(
        rule
    ) == {"─"}
    path, label, score, *rest = good.split()
    assert (
        path == str(folder / "img1.png")
        and label in LABELS
        and score.endswith("%")
        and len(rest) == 4
    )
    assert (
        bad.split()[:2] == [str(folder / "cases" / "text.jpg"), "failed"]
        and "not a recognised image" in bad
    )
    result = CliRunner().invoke(
        app, [*args, "--format", "table", "--output", str(tmp_path / "t.txt")]
    )
    assert result.exit_code == 2 and "--format table is for the terminal" in result.output
    assert not (tmp_path / "t.txt").exists()


def test_top_k_is_clipped_and_logits_are_raw(folder, model_file):
    runner = CliRunner()
    base = [
        "predict",
        str(folder / "img1.png"),
        "--model",
        str(model_file),
        "--workers",
        "0",
        "--format",
        "jsonl",
    ]
    result = runner.invoke(app, [*base, "--top-k", "50"])
    assert result.exit_code == 0, result.output
    (probs,) = jsonl(result.stdout)
    assert len(probs["predictions"]) == 5  # clipped to the 5 classes
    assert sum(p["score"] for p in probs["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert "1 of 1 images classified by " in result.stderr and "(5 classes) in" in result.stderr
    (raw,) = jsonl(runner.invoke(app, [*base, "--top-k", "50", "--logits"]).stdout)
    logits = torch.tensor([p["score"] for p in raw["predictions"]])
    assert [p["index"] for p in raw["predictions"]] == [p["index"] for p in probs["predictions"]]
    assert torch.allclose(
        logits.softmax(0), torch.tensor([p["score"] for p in probs["predictions"]]), atol=1e-6
    )
    assert abs(float(logits.sum()) - 1.0) > 1e-3
    result = runner.invoke(app, [*base, "--top-k", "0"])
    assert result.exit_code == 2  # a usage error, in our words (cli.common.whole_number)
    assert "error: --top-k must be a whole number 1 or more, got 0" in result.output


def test_quiet_success_prints_nothing_on_stderr(folder, model_file):
    result = CliRunner().invoke(
        app, ["predict", str(folder / "img2.png"), "--model", str(model_file), "-q", "-f", "jsonl"]
    )
    assert result.exit_code == 0 and result.stderr == "" and len(jsonl(result.stdout)) == 1


# -- inputs: stdin, globs, named non-images --------------------------------------------------------


def test_stdin_paths_and_quoted_globs_in_a_real_pipe(folder, model_file):
    stdin = f"{folder / 'img10.png'}\n\n{folder / 'missing.png'}\n"
    result = run_cli(
        "predict",
        "-",
        str(folder / "img?.png"),
        str(folder / "notes.txt"),
        "--model",
        str(model_file),
        "--top-k",
        "2",
        stdin=stdin,
    )
    assert result.returncode == 1, result.stderr
    records = jsonl(result.stdout)
    assert [Path(r["path"]).name for r in records] == [
        "img10.png",
        "missing.png",
        "img1.png",
        "img2.png",
        "notes.txt",
    ]
    assert records[1]["error"].endswith("no such file or folder")
    assert "not an image file" in records[4]["error"]
    for record in records:
        check_record(record, top_k=2)


def test_user_mistakes_are_one_red_line(model_file, tmp_path):
    runner = CliRunner()
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")  # an input, so the model is the mistake
    result = runner.invoke(
        app, ["predict", str(tmp_path), "--model", str(tmp_path / "nope.safetensors")]
    )
    assert (
        result.exit_code == 1
        and "no such file" in result.output
        and "Traceback" not in result.output
    )
    result = (
        runner.invoke(
            app, ["predict", str(tmp_path), "--model", str(model_file), "--device", "cuda"]
        )
        if not torch.cuda.is_available()
        else None
    )
    if result is not None:
        assert result.exit_code == 1 and "no CUDA GPU" in result.output


# -- the service ----------------------------------------------------------------------------------


def test_records_stream_batch_by_batch(model_file, tmp_path):
    """The first batch's records arrive before later files are even read: nothing is held."""
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    for path in paths[:2]:
        Image.fromarray(photo(20, 20, seed=1)).save(path)
    run = PredictRun(
        load_model(model_file),
        [InputItem(str(p)) for p in paths],
        PredictOptions(batch_size=2, workers=0),
    )
    stream = run.records()
    first = next(stream)
    assert [r["path"] for r in first] == [str(p) for p in paths[:2]] and all(
        "predictions" in r for r in first
    )
    for path in paths[2:]:  # written only now
        Image.fromarray(photo(20, 20, seed=2)).save(path)
    rest = [record for batch in stream for record in batch]
    assert len(rest) == 4 and all("predictions" in r for r in rest)
    assert run.summary.total == 6 and run.summary.failed == 0


def test_jsonl_keeps_finished_batches_when_interrupted_and_json_stays_atomic(tmp_path):
    record = {"path": "a.png", "predictions": [{"label": "cat", "index": 0, "score": 0.5}]}
    (tmp_path / "out.json").write_text("old")
    for fmt in ("jsonl", "json", "csv"):
        with (
            pytest.raises(KeyboardInterrupt),
            open_writer(fmt, tmp_path / f"out.{fmt}", top_k=1) as writer,
        ):
            writer.write([record])
            if fmt == "jsonl":  # flushed per batch: already on disk mid-run
                assert jsonl((tmp_path / "out.jsonl").read_text()) == [record]
            raise KeyboardInterrupt
    assert jsonl((tmp_path / "out.jsonl").read_text()) == [record]
    assert (tmp_path / "out.json").read_text() == "old"  # untouched, no half-written file
    assert not (tmp_path / "out.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.jsonl"]


def test_device_and_dtype_choice_on_this_machine():
    cpu = resolve_device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.float32, None)  # never bf16/fp16 on a CPU
    if not torch.cuda.is_available() and not (torch.backends.mps.is_available()):
        assert resolve_device("auto") == cpu
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
    dtype, warning = resolve_dtype("float16", cpu)
    assert dtype == torch.float16 and "slower" in warning
    with pytest.raises(InputError, match="--dtype float8: use one of"):
        resolve_dtype("float8", cpu)


def test_bfloat16_runs_and_roughly_agrees(model_file, folder, monkeypatch):
    from vitcli import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)  # emulated where it is not
    items = [InputItem(str(folder / "img1.png"))]
    bundle = load_model(model_file)
    full = next(predict_paths(bundle, items, PredictOptions(workers=0, top_k=5)))
    half = next(
        predict_paths(
            load_model(model_file), items, PredictOptions(workers=0, top_k=5, dtype="bfloat16")
        )
    )
    assert [p["score"] for p in half["predictions"]] == pytest.approx(
        [p["score"] for p in full["predictions"]], abs=0.05
    )


# -- distributed -----------------------------------------------------------------------------------


def test_shards_are_disjoint_and_complete():
    for count in (0, 1, 7, 10):
        for world in (1, 2, 3):
            shards = [list(distributed.shard(count, rank, world)) for rank in range(world)]
            flat = sorted(p for shard in shards for p in shard)
            assert flat == list(range(count))


@pytest.mark.slow
def test_torchrun_two_ranks_write_one_merged_output_in_input_order(folder, model_file, tmp_path):
    """Two ranks under the real torchrun: rank 0 writes every record once, in order, with the
    same scores as a single process. A bad image is a record and a count in rank 0's one-line
    summary, never a reason for torchrun's ChildFailedError traceback: every rank exits 0."""
    inputs = [str(folder / n) for n in ("img1.png", "img2.png", "img10.png")]
    inputs += [str(folder / "cases" / n) for n in ("zero.jpg", "ok.jpg", "la.png", "cmyk.jpg")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "vitcli",
            "predict",
            *inputs,
            "--model",
            str(model_file),
            "--batch-size",
            "2",
            "--workers",
            "1",
            "--logits",
            "--output",
            str(tmp_path / "merged.json"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    summaries = [line for line in result.stderr.splitlines() if "images classified" in line]
    assert len(summaries) == 1 and "6 of 7 images classified, 1 failed" in summaries[0]
    assert "x 2 ranks" in summaries[0]
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.json"]
    assert [r["path"] for r in merged] == inputs
    single = list(
        predict_paths(
            load_model(model_file),
            [InputItem(p) for p in inputs],
            PredictOptions(workers=0, logits=True),
        )
    )
    assert [r.keys() for r in merged] == [r.keys() for r in single]
    for got, want in zip(merged, single):
        if "predictions" in want:
            assert [p["index"] for p in got["predictions"]] == [
                p["index"] for p in want["predictions"]
            ]
            assert np.allclose(
                [p["score"] for p in got["predictions"]],
                [p["score"] for p in want["predictions"]],
                atol=1e-5,
            )
        else:
            assert got == want


def test_batches_travel_as_uint8_and_normalise_exactly_as_one_image_at_a_time(folder):
    """Workers send resized uint8 pixels; `normalize` must give bit for bit the float input
    that Preprocess gives image by image (same float32 operations in the same order)."""
    from vitcli.data.images import open_image
    from vitcli.data.loader import image_batches, normalize
    from vitcli.data.preprocess import Preprocess

    paths = [str(folder / f"img{i}.png") for i in (1, 2, 10)] + [str(folder / "cases" / "cmyk.jpg")]
    preprocess = Preprocess(size=(24, 40), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    (batch,) = list(image_batches(paths, preprocess, batch_size=4, workers=1))
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (4, 3, 24, 40)

    def documented(path):  # x / 255, then (x - mean) / std, written out in numpy
        image = preprocess.resize_image(*open_image(path))  # decoded in full, as the loader
        x = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)  # H,W,C
        x = (x - np.float32(preprocess.mean)) / np.float32(preprocess.std)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    expected = np.stack([documented(path) for path in paths])
    assert torch.equal(normalize(batch.pixels, preprocess), torch.from_numpy(expected))
    # Every batch arrives normalised already (no consumer can forget), by the same function.
    assert batch.inputs is not None and torch.equal(batch.inputs, torch.from_numpy(expected))
    with pytest.raises(TypeError, match="already normalised"):
        normalize(batch.inputs, preprocess)
