"""Hostile model folders: transformers and timm configs with absurd or mistyped values, bad
preprocessor files, shard indexes that escape the folder or name devices, FIFOs that would
hang a reader. One CheckpointError line each, nothing large allocated, nothing hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import (
    bin_folder,
    forbid_building,
    hf_folder,
    refused,
    savez,
    timm_folder,
)
from safetensors.torch import load_file, save_file

from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if a real (allocating) ViT is constructed: refusals must come first."""
    forbid_building(monkeypatch)


# -- transformers folders ----------------------------------------------------------------
def test_hand_written_hf_folder_loads(tmp_path):
    bundle = load_model(str(hf_folder(tmp_path / "hf")))
    assert bundle.labels == ["a", "b", "c"] and bundle.config.width == 32


def test_hf_query_key_value_that_do_not_stack(tmp_path):
    folder = hf_folder(tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["vit.encoder.layer.0.attention.attention.key.weight"] = torch.zeros(32, 16)
    save_file(tensors, str(folder / "model.safetensors"))
    refused(folder, "model.safetensors: block 0 q/k/v weight have shapes", "do not stack")


HF_CONFIGS: dict[str, tuple[Any, str]] = {
    "hidden-size-1e9": ({"hidden_size": 10**9}, "hidden_size = 1000000000 is out of range"),
    "layers-1e6": ({"num_hidden_layers": 10**6}, "num_hidden_layers = 1000000 is out of range"),
    "heads-do-not-divide": ({"num_attention_heads": 5}, "num_attention_heads = 5 does not divide"),
    "patch-0": ({"patch_size": 0}, "patch_size = 0 is out of range"),
    "patch-pair": ({"patch_size": [8, 16]}, "square only"),
    "image-huge": ({"image_size": 10**7}, "image_size"),
    "eps-negative": ({"layer_norm_eps": -1}, "layer_norm_eps"),
    "eps-string": ({"layer_norm_eps": "small"}, "layer_norm_eps"),
    "integer-labels": ({"id2label": {"0": 1, "1": 2, "2": 3}}, "not a class name"),
    "label-count": ({"id2label": {"0": "a"}}, "id2label has 1 entries"),
    "label-keys": ({"id2label": {"x": "a", "y": "b", "z": "c"}}, "keys must be class indices"),
    "act": ({"hidden_act": ["gelu"]}, "hidden_act"),
}


@pytest.mark.parametrize("case", sorted(HF_CONFIGS))
def test_hf_config_values_are_checked_first(tmp_path, never_built, case):
    changes, fragment = HF_CONFIGS[case]
    refused(hf_folder(tmp_path / "hf", **changes), fragment)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[]", "expected a JSON object, not list"),
        ("{oops", "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_config_json_that_is_not_an_object(tmp_path, text, fragment):
    folder = hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text(text)
    refused(folder, "config.json", fragment)


BAD_PREPROCESSOR: dict[str, tuple[Any, str]] = {
    "std-zero": ({"image_std": [0, 0, 0]}, "std must be positive"),
    "mean-nan": ({"image_mean": [float("nan"), 0.5, 0.5]}, "mean must be 3 finite numbers"),
    "size-zero": ({"size": {"height": 0, "width": 0}}, "out of range"),
    "size-huge": ({"size": {"height": 10**6, "width": 10**6}}, "out of range"),
    "resample": ({"resample": 99}, "resample 99 is not a PIL filter"),
    "edge-zero-crop": (
        {"size": {"shortest_edge": 0}, "do_center_crop": True, "crop_size": 32},
        "unusable preprocessing",
    ),
    "rescale-zero": ({"rescale_factor": 0}, "rescale must be a positive number"),
    "edge-no-crop": ({"size": {"shortest_edge": 32}}, "without a centre crop"),
    "not-object": ([], "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREPROCESSOR))
def test_hf_preprocessor_values_are_checked(tmp_path, case):
    spec, fragment = BAD_PREPROCESSOR[case]
    folder = hf_folder(tmp_path / "hf")
    (folder / "preprocessor_config.json").write_text(json.dumps(spec))
    refused(folder, "preprocessor_config.json", fragment)


def sharded(folder: Path, shard_names: list) -> Path:
    hf_folder(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model-00001-of-00001.safetensors"))
    weight_map = {name: shard_names[i % len(shard_names)] for i, name in enumerate(tensors)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_sharded_folder_loads(tmp_path):
    bundle = load_model(str(sharded(tmp_path / "hf", ["model-00001-of-00001.safetensors"])))
    assert bundle.extra["weights_file"] == "model.safetensors.index.json"


@pytest.mark.parametrize(
    "shard,fragment",
    [
        (7, "shard name 7 is not a string"),
        (None, "shard name None is not a string"),
        (["a"], "is not a string"),
        ("../outside.safetensors", "not a file name in the model folder"),
        ("/dev/zero", "not a file name in the model folder"),
        ("sub/model.safetensors", "not a file name in the model folder"),
        ("..", "not a file name in the model folder"),
        ("", "not a file name in the model folder"),
    ],
)
def test_shard_names_that_escape_or_are_not_strings(tmp_path, shard, fragment):
    (tmp_path / "outside.safetensors").write_bytes(b"never read")
    refused(sharded(tmp_path / "hf", ["model-00001-of-00001.safetensors", shard]), fragment)


def test_shard_index_without_a_weight_map(tmp_path):
    folder = sharded(tmp_path / "hf", ["model-00001-of-00001.safetensors"])
    for text in ("[]", '{"weight_map": []}', '{"weight_map": {}}'):
        (folder / "model.safetensors.index.json").write_text(text)
        refused(folder, "broken shard index")


def test_shard_that_is_a_device_is_never_read(tmp_path):
    folder = sharded(tmp_path / "hf", ["model-00001-of-00001.safetensors", "zero.safetensors"])
    (folder / "zero.safetensors").symlink_to("/dev/zero")
    refused(folder, "zero.safetensors", "not a regular file")


# -- timm folders --------------------------------------------------------------------------
TIMM_CONFIGS: dict[str, tuple[Any, str]] = {
    "embed-dim-1e9": (
        {"model_args": dict(embed_dim=10**9, depth=2, num_heads=4, patch_size=8, img_size=32)},
        "embed_dim = 1000000000 is out of range",
    ),
    "depth-1e6": (
        {"model_args": dict(embed_dim=32, depth=10**6, num_heads=4, patch_size=8, img_size=32)},
        "depth = 1000000 is out of range",
    ),
    "mlp-ratio-nan": (
        {"model_args": dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=float("nan"))},
        "unusable timm config",
    ),
    "classes-1e9": ({"num_classes": 10**9}, "num_classes = 1000000000 is out of range"),
    "classes-text": ({"num_classes": "many"}, "num_classes = 'many' is not a whole number"),
    "model-args-list": ({"model_args": [1, 2]}, "must be JSON objects"),
    "architecture-number": ({"architecture": 5}, "is not a name"),
    "integer-label-names": ({"label_names": [1, 2, 3, 4, 5]}, "label_names must be a list"),
    "input-size-text": ({"pretrained_cfg": {"input_size": "abc"}}, "unusable timm"),
    "crop-negative": ({"pretrained_cfg": {"crop_pct": -1}}, "crop_pct must be in (0, 1]"),
    "std-zero": ({"pretrained_cfg": {"std": [0, 0, 0]}}, "std must be positive"),
    "interpolation": ({"pretrained_cfg": {"interpolation": "magic"}}, "unknown interpolation"),
}


@pytest.mark.parametrize("case", sorted(TIMM_CONFIGS))
def test_timm_config_values_are_checked(tmp_path, tiny_model, case):
    changes, fragment = TIMM_CONFIGS[case]
    refused(timm_folder(tmp_path / "timm", tiny_model, **changes), fragment)


# -- FIFOs and start-up cost --------------------------------------------------------------
@pytest.mark.slow
def test_fifos_never_hang(tmp_path):
    """A FIFO as --model, as a folder's config.json and as its weights: refused at once.

    Run in a subprocess with a timeout, so that a regression fails instead of hanging."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    config_fifo = hf_folder(tmp_path / "config-fifo")
    (config_fifo / "config.json").unlink()
    os.mkfifo(config_fifo / "config.json")
    weights_fifo = hf_folder(tmp_path / "weights-fifo")
    (weights_fifo / "model.safetensors").unlink()
    os.mkfifo(weights_fifo / "model.safetensors")
    script = (
        "import sys\n"
        "from vitcli.errors import VitError\n"
        "from vitcli.weights.resolve import load_model\n"
        "for ref in sys.argv[1:]:\n"
        "    try:\n"
        "        load_model(ref)\n"
        "    except VitError as error:\n"
        "        print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(fifo), str(config_fifo), str(weights_fifo)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    assert all("not a regular file" in line for line in lines), lines


@pytest.mark.slow
def test_header_checks_stay_cheap_for_every_format(tmp_path, tiny_model, tiny_model_file):
    """The shape checks run on the meta device without importing torch._dynamo (seconds of
    start-up for every command): pinned in a fresh process over each kind of checkpoint."""
    from checkpoints import to_google

    refs = [tiny_model_file, hf_folder(tmp_path / "hf"), timm_folder(tmp_path / "timm", tiny_model)]
    refs.append(bin_folder(tmp_path / "bin", torch.save))
    npz = tmp_path / "m.npz"
    savez(npz, **to_google(tiny_model))
    refs.append(npz)
    script = (
        "import sys\n"
        "from vitcli.weights.resolve import load_model\n"
        "for ref in sys.argv[1:]:\n"
        "    load_model(ref)\n"
        "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, refs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no dynamo"
