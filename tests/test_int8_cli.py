"""`--int8` on predict, attention and eval, and `vit convert --int8`: same answers as float32,
refused where int8 cannot run (another device, another dtype, gradient-based maps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vitcli.cli import app

SHAPES = ("shapes-ring.jpg", "shapes-star.jpg", "shapes-triangle.jpg")


@pytest.fixture(autouse=True)
def torch_engine(monkeypatch):
    """These tests pin the torch engine (an int8 file computes what --int8 does on it);
    tests/test_int8_ort.py covers the onnxruntime engine that --int8 picks when installed."""
    monkeypatch.setenv("VITCLI_INT8_ENGINE", "torch")


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def predictions(*args: str) -> dict[str, dict]:
    """`vit predict ... -f jsonl --logits -q` -> {file name: record}."""
    result = invoke("predict", *args, "-f", "jsonl", "--logits", "-q", "-w", "0")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {Path(record["path"]).name: record for record in records}


def one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_predict_int8_agrees_with_float32(tiny_model_file, examples_dir):
    images = [examples_dir / name for name in (*SHAPES, "chelsea.png", "coffee.png")]
    fp32 = predictions(*images, "-m", tiny_model_file)
    int8 = predictions(*images, "-m", tiny_model_file, "--int8")
    assert set(fp32) == set(int8) and len(fp32) == len(images)
    assert fp32 != int8  # the int8 layers did run: float32 logits are not reproduced exactly
    for name, record in fp32.items():
        ours = int8[name]["predictions"]
        assert ours[0]["index"] == record["predictions"][0]["index"], name
        ref = {p["index"]: p["score"] for p in record["predictions"]}
        spread = max(ref.values()) - min(ref.values())
        for p in ours:  # int8 moves the logits a little, never like a different model
            assert abs(p["score"] - ref[p["index"]]) < 0.05 * spread + 1e-3, (name, p)


@pytest.mark.parametrize(
    ("command", "extra", "words"),
    [
        ("predict", ("--device", "cuda"), ("CPU only", "--device cuda")),
        ("predict", ("--device", "mps"), ("CPU only", "--device mps")),
        ("predict", ("--dtype", "bfloat16"), ("float32", "--dtype bfloat16")),
        ("predict", ("--dtype", "float16"), ("float32", "--dtype float16")),
        ("attention", ("--device", "cuda:0"), ("CPU only", "--device cuda:0")),
        ("attention", ("--method", "gae"), ("--method gae", "gradients", "raw or rollout")),
        ("attention", ("--method", "rollout,attribution,gradcam"), ("attribution,gradcam",)),
    ],
)
def test_int8_refused_where_it_cannot_run(command, extra, words, tiny_model_file, examples_dir):
    image = examples_dir / SHAPES[0]
    result = invoke(command, image, "-m", tiny_model_file, "--int8", *extra)
    one_line_error(result, 2, *words)


def test_eval_int8_refused_on_a_gpu(tmp_path):
    result = invoke("eval", tmp_path, "--int8", "--device", "cuda")
    one_line_error(result, 2, "CPU only", "--device cuda")


def test_attention_int8_maps_stay_close_to_float32(tmp_path, tiny_model_file, examples_dir):
    from safetensors.numpy import load_file

    image = examples_dir / "shapes-star.jpg"
    maps = {}
    for name, flags in (("fp32", ()), ("int8", ("--int8",))):
        out = tmp_path / name
        result = invoke(
            "attention", image, "-m", tiny_model_file, "-o", out, "-q", "-w", "0", *flags
        )
        assert result.exit_code == 0, result.output
        (folder,) = [path for path in out.iterdir() if path.is_dir()]
        maps[name] = load_file(folder / "maps.safetensors")
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["options"]["int8"] is (name == "int8")
    assert set(maps["fp32"]) == set(maps["int8"])
    assert any(not np.array_equal(maps["fp32"][key], maps["int8"][key]) for key in maps["fp32"])
    for key, ref in maps["fp32"].items():
        ours = maps["int8"][key]
        assert ours.shape == ref.shape, key
        a, b = ref.ravel().astype(np.float64), ours.ravel().astype(np.float64)
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.995, (key, cosine)


@pytest.mark.slow
def test_eval_int8_agrees_with_float32(tmp_path):
    from vitcli.services.evaluate import EvalOptions, run

    data = tmp_path / "shapes"
    made = invoke("data", "shapes", data, "--per-class", "3", "--seed", "2", "-q")
    assert made.exit_code == 0, made.output
    fp32 = run(EvalOptions(data=str(data), workers=0, device="cpu"))
    int8 = run(EvalOptions(data=str(data), workers=0, int8=True))
    assert int8.images == fp32.images == 18
    assert int8.predictions == fp32.predictions
    assert int8.top1 == fp32.top1


def test_convert_int8_round_trip(tmp_path, examples_dir):
    """The bundled model stored in int8 loads ready (no quantising), answers as float32 does,
    and runs on the CPU only."""
    from vitcli.model.int8 import Int8Linear
    from vitcli.weights.locate import default_model_path
    from vitcli.weights.resolve import load_model

    target = tmp_path / "bundled-int8.safetensors"
    result = invoke("convert", "bundled", target, "--int8")
    assert result.exit_code == 0, result.output
    assert "int8" in result.output
    assert target.stat().st_size < default_model_path().stat().st_size  # float16, bundled
    bundle = load_model(str(target))
    assert isinstance(bundle.model.head, Int8Linear)
    assert bundle.extra["quantization"]

    images = [examples_dir / name for name in SHAPES]
    fp32 = predictions(*images)
    from_file = predictions(*images, "-m", target)
    flag = predictions(*images, "--int8")
    for name in fp32:
        top = fp32[name]["predictions"][0]["label"]
        assert from_file[name]["predictions"][0]["label"] == top == name[7:-4]
        # The file holds exactly what --int8 computes at load time.
        assert from_file[name]["predictions"] == flag[name]["predictions"]

    info = invoke("info", target)
    assert info.exit_code == 0 and "int8" in info.output, info.output
    one_line_error(invoke("predict", images[0], "-m", target, "--device", "cuda"), 1, "CPU only")
    one_line_error(
        invoke("attention", images[0], "-m", target, "--method", "gae", "-o", tmp_path / "a"),
        2,
        "gradients",
        "int8 weights",
    )
    one_line_error(invoke("convert", target, tmp_path / "f.safetensors"), 2, "--int8")
    assert not (tmp_path / "f.safetensors").exists()
    again = invoke("convert", target, tmp_path / "again.safetensors", "--int8")
    assert again.exit_code == 0, again.output
    assert load_model(str(tmp_path / "again.safetensors")).model.state_dict().keys() == (
        bundle.model.state_dict().keys()
    )
    one_line_error(
        invoke("convert", "bundled", tmp_path / "x.safetensors", "--int8", "--fp16"), 2, "choose"
    )


def test_prepare_int8_quantises_once_and_leaves_float_runs_alone(tiny_model_file):
    from vitcli.model.int8 import Int8Linear, is_quantized
    from vitcli.services.int8 import prepare_int8
    from vitcli.weights.resolve import load_model

    bundle = load_model(str(tiny_model_file))
    assert prepare_int8(bundle, False, "cuda", "bfloat16") == "cuda"  # not asked: untouched
    assert not is_quantized(bundle.model)
    assert prepare_int8(bundle, True, "auto") == "cpu"
    head = bundle.model.head
    assert isinstance(head, Int8Linear)
    assert prepare_int8(bundle, True, "cpu", "float32") == "cpu"
    assert bundle.model.head is head  # already int8: not quantised again


def test_int8_file_copied_into_a_folder_loads(tmp_path):
    """A folder holding only an int8 file resolves to it, as for a float file."""
    from vitcli.model.int8 import is_quantized
    from vitcli.weights.resolve import load_model

    invoke("convert", "bundled", tmp_path / "m.safetensors", "--int8")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(tmp_path / "m.safetensors", folder / "model.safetensors")
    assert is_quantized(load_model(str(folder)).model)


def test_an_int8_file_is_held_to_the_limits_of_a_float_file(tmp_path, examples_dir):
    """A config asking for a huge model is refused before anything is built."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    honest = tmp_path / "m.safetensors"
    assert invoke("convert", "bundled", honest, "--int8").exit_code == 0
    with safe_open(str(honest), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
    config = json.loads(metadata["config"])
    config["width"] = 1_000_000_000
    metadata["config"] = json.dumps(config)
    hostile = tmp_path / "hostile.safetensors"
    save_file(tensors, str(hostile), metadata=metadata)
    result = invoke("predict", examples_dir / SHAPES[0], "-m", hostile)
    one_line_error(result, 1, "width")


def test_embed_int8_stays_close_to_float32(tiny_model_file, examples_dir, tmp_path):
    runs = {}
    for name, extra in (("fp32", ()), ("int8", ("--int8",))):
        out = tmp_path / f"{name}.jsonl"
        result = invoke(
            "embed",
            str(examples_dir),
            "-m",
            str(tiny_model_file),
            "-o",
            str(out),
            "-w",
            "0",
            "-q",
            *extra,
        )
        assert result.exit_code == 0, result.output
        runs[name] = {
            r["path"]: np.asarray(r["embedding"])
            for r in map(json.loads, out.read_text().splitlines())
        }
    assert runs["fp32"].keys() == runs["int8"].keys() and len(runs["fp32"]) == 7
    for path, a in runs["fp32"].items():
        b = runs["int8"][path]
        assert a.shape == b.shape and not np.array_equal(a, b)  # int8 really ran
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


@pytest.mark.parametrize("command", ["predict", "embed", "eval"])
def test_the_int8_decision_is_made_once_per_run(command, monkeypatch, tmp_path, examples_dir):
    """prepare_int8 (quantise, or check an int8 file's device) runs once, not once per layer
    of the service."""
    import importlib

    from vitcli.services import int8

    module = importlib.import_module(
        {"predict": "vitcli.services.predict", "embed": "vitcli.services.embed"}.get(
            command, "vitcli.services.evaluate"
        )
    )
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return int8.prepare_int8(*args, **kwargs)

    monkeypatch.setattr(module, "prepare_int8", counted)
    image = examples_dir / SHAPES[0]
    if command == "eval":
        data = tmp_path / "shapes"
        assert invoke("data", "shapes", data, "--per-class", "1", "-q").exit_code == 0
        args = ["eval", data]
    elif command == "embed":
        args = ["embed", image, "-o", tmp_path / "e.jsonl"]
    else:
        args = ["predict", image]
    result = invoke(*args, "--int8", "-w", "0", "-q")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
