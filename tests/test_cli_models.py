"""`vit info` and `vit convert` through CliRunner and real subprocesses, and every kind of bad
checkpoint: one red line, exit status 1, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from checkpoints import TINY_LABELS, populate_hub_cache, random_vit, to_google
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from vitcli.cli import app
from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]


def vit(*args: object) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def hf_folder(folder: Path, seed: int = 0, **fields: Any) -> tuple[Path, Any]:
    transformers = pytest.importorskip("transformers")
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    settings.update(fields)
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**settings)).eval()
    model.save_pretrained(folder)
    return folder, model


# -- vit info ----------------------------------------------------------------------------------
def test_info_table(tiny_model_file):
    result = vit("info", tiny_model_file)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "source format vitcli" in text
    assert "patch 8, image 32x32" in text and "32 / 2 / 4 / 64" in text
    assert "labels 5: cat | dog | bird | fish | frog" in text
    assert "resize to 32x32, bilinear (PIL)" in text and "EXIF orientation" in text
    assert text.lower().count("gelu") == 1 and "layer norm eps 1e-06" in text  # stated once


def test_info_json(tiny_model, tiny_model_file):
    result = vit("info", tiny_model_file, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (
        data["source_format"] == "vitcli"
        and data["labels"] == TINY_LABELS
        and data["num_labels"] == 5
    )
    assert data["num_parameters"] == sum(p.numel() for p in tiny_model.parameters())
    assert data["config"] == json.loads(tiny_model.config.to_json())
    assert data["preprocess"]["resize"] == "squash"


def test_info_says_pre_logits_were_dropped(tmp_path):
    arrays = to_google(random_vit(num_classes=11), pre_logits="zero-head")
    cast(Any, np.savez)(tmp_path / "imagenet21k_ViT-tiny.npz", **arrays)
    result = vit("info", tmp_path / "imagenet21k_ViT-tiny.npz")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "source format npz" in text and "labels 11: class_0" in text
    assert "dropped pre_logits (a dense + tanh layer" in text and "all zeros" in text


def test_info_of_the_bundled_model_by_name_hides_its_build_paths():
    for name in ("vit-shapes-p16", "bundled"):
        result = vit("info", name)
        assert result.exit_code == 0, result.output
        text = " ".join(result.stdout.split())
        assert "model vit-shapes-p16" in text
        # Six labels: all of them, no "..."
        assert "labels 6: circle | cross | ring | square | star | triangle" in text
        assert "runs/" not in result.stdout and "best.safetensors" not in result.stdout
        assert "bundled with vitcli" in text
    data = json.loads(vit("info", "bundled", "--json").stdout)
    assert data["reference"] == "vit-shapes-p16" and "runs/" not in json.dumps(data)


def test_info_shows_up_to_20_labels_in_full_and_escapes_control_characters(tmp_path):
    from vitcli.weights.format import save_model

    many = [f"label{i}" for i in range(20)]
    path = save_model(random_vit(num_classes=20), tmp_path / "twenty.safetensors", labels=many)
    text = " ".join(vit("info", path).stdout.split())
    assert "label0 | label1" in text and "label19" in text and "..." not in text
    path = save_model(
        random_vit(num_classes=21), tmp_path / "more.safetensors", labels=many + ["x"]
    )
    text = " ".join(vit("info", path).stdout.split())
    assert "labels 21: label0 | label1 | label2 | label3 | label4 | ..." in text
    hostile = ["\x1b[2Jclear", "cr\rlf", "b", "c", "d"]
    path = save_model(random_vit(), tmp_path / "esc.safetensors", labels=hostile)
    result = vit("info", path)
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "\\x1b[2Jclear" in result.stdout


# -- vit convert -------------------------------------------------------------------------------
def test_convert_hf_folder_to_our_format(tmp_path):
    folder, reference = hf_folder(tmp_path / "hf")
    destination = tmp_path / "out" / "converted.safetensors"
    result = vit("convert", folder, destination)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "3 labels" in result.stdout and "float32" in result.stdout
    assert not list(destination.parent.glob(".*.tmp"))  # the atomic write left no temp file
    bundle = load_model(str(destination))
    assert bundle.source_format == "vitcli" and bundle.extra["source"] == f"hf: {folder}"
    assert bundle.labels == [reference.config.id2label[i] for i in range(3)]
    assert bundle.config.ln_eps == reference.config.layer_norm_eps
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            bundle.model(x), reference(pixel_values=x).logits, atol=1e-4, rtol=0
        )


def test_convert_fp16_halves_the_file(tmp_path, tiny_model_file):
    half = tmp_path / "half.safetensors"
    result = vit("convert", tiny_model_file, half, "--fp16")
    assert result.exit_code == 0 and "float16" in result.stdout
    assert all(t.dtype == torch.float16 for t in load_file(str(half)).values())
    assert half.stat().st_size < 0.6 * tiny_model_file.stat().st_size
    assert load_model(str(half)).labels == TINY_LABELS


def test_convert_refuses_another_extension(tmp_path, tiny_model_file):
    result = vit("convert", tiny_model_file, tmp_path / "out.pt")
    assert result.exit_code == 2  # a usage error
    assert (
        result.stderr.strip().startswith("error: ") and "must end in .safetensors" in result.stderr
    )
    assert not (tmp_path / "out.pt").exists()


def test_fetch_reads_the_cache_offline_and_explains_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = populate_hub_cache(
        tmp_path / "hub",
        "tiny-org/cached",
        {
            "config.json": b'{"model_type": "vit"}',
            "model.safetensors": b"weights",
        },
    )
    result = vit("fetch", "tiny-org/cached")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(snapshot)
    assert_one_line_error(
        vit("fetch", "tiny-org/absent"), "not in the local cache", "vit fetch tiny-org/absent"
    )


# -- bad input ---------------------------------------------------------------------------------
def _truncated(tmp_path, source: Path) -> Path:
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


def _corrupt(tmp_path, source: Path) -> Path:
    data = bytearray(source.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    return path


def _pickle(tmp_path, source: Path) -> Path:
    path = tmp_path / "pickled.safetensors"
    torch.save(load_file(str(source)), path)
    return path


def _unknown_keys(tmp_path, source: Path) -> Path:
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(source))
    tensors["classifier.weight"] = tensors.pop("head.weight")
    del tensors["norm.bias"]
    path = tmp_path / "renamed.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _wrong_shapes(tmp_path, source: Path) -> Path:
    folder, _ = hf_folder(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128  # weights were saved with 64
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _missing(tmp_path, source: Path) -> Path:
    return tmp_path / "nowhere" / "model.safetensors"


def _empty(tmp_path, source: Path) -> Path:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return path


def _not_an_npz(tmp_path, source: Path) -> Path:
    path = tmp_path / "ViT-B_16.npz"
    path.write_bytes(b"this is not a zip archive")
    return path


BAD_INPUTS = {
    "truncated": (_truncated, ["not a readable safetensors file", "truncated or corrupt"]),
    "corrupt": (_corrupt, ["not a readable safetensors file"]),
    "empty": (_empty, ["not a readable safetensors file"]),
    "pickle-as-safetensors": (_pickle, ["pickle", "not safetensors"]),
    "unknown-keys": (
        _unknown_keys,
        ["missing 2 keys (head.weight, norm.bias)", "unexpected 1 keys (classifier.weight)"],
    ),
    "wrong-shapes": (
        _wrong_shapes,
        ["wrong tensor shapes", "blocks.0.mlp.fc1.weight is (64, 32), expected (128, 32)"],
    ),
    "missing-path": (_missing, ["no such file or folder"]),
    "not-an-npz": (_not_an_npz, ["not a readable .npz"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["info", "convert"])
def test_bad_checkpoint_is_one_line_and_exit_1(tmp_path, tiny_model_file, case, command):
    make, fragments = BAD_INPUTS[case]
    path = make(tmp_path, tiny_model_file)
    args = ["info", path] if command == "info" else ["convert", path, tmp_path / "out.safetensors"]
    assert_one_line_error(vit(*args), *fragments)
    assert not (tmp_path / "out.safetensors").exists()


# -- real subprocesses -------------------------------------------------------------------------
def run_vit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitcli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


def test_subprocess_info_and_offline_error(tmp_path, tiny_model_file):
    done = run_vit("info", tiny_model_file, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["labels"] == TINY_LABELS and data["extra"]["source"] == "test"
    offline = run_vit(
        "info",
        "tiny-org/never-fetched",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")},
    )
    assert offline.returncode == 1 and offline.stdout == ""
    lines = offline.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in offline.stderr
    assert "not in the local cache" in lines[0] and "vit fetch tiny-org/never-fetched" in lines[0]
