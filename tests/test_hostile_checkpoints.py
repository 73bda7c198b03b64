"""Hostile checkpoints: absurd configs, lying headers, bombs, escaping shard names, FIFOs,
pickles. Each must end in one CheckpointError line, before anything large is allocated, and
never pass on a library's advice to load unsafely. Files are tiny and built here."""

from __future__ import annotations

import io
import json
import math
import os
import resource
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from vitcli.cli import app
from vitcli.errors import CheckpointError, VitError
from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]
UNSAFE_ADVICE = ("weights_only", "allow_pickle", "trust")


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if a real (allocating) ViT is constructed: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("ViT(...) was built before the checkpoint was refused")

    monkeypatch.setattr("vitcli.weights.format.ViT", refuse)


def refused(reference, *fragments: str) -> str:
    """load_model(reference) raises one CheckpointError line holding every fragment."""
    with pytest.raises(VitError) as caught:
        load_model(str(reference))
    message = str(caught.value)
    assert isinstance(caught.value, CheckpointError), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    for advice in UNSAFE_ADVICE:
        assert advice not in message, message
    return message


savez = cast(Any, np.savez)  # numpy's stubs take **arrays for its own keyword arguments


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# -- our format: metadata ------------------------------------------------------------------
def rewrite(source: Path, target: Path, **changes) -> Path:
    """`source` (our format) with metadata entries replaced: a dict for config/preprocess is
    merged into the stored fields, a string replaces the entry's text."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    for key in ("config", "preprocess"):
        if isinstance(changes.get(key), dict):
            data = json.loads(metadata[key])
            data.update(changes.pop(key))
            metadata[key] = json.dumps(data)
    metadata.update(changes)
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


ABSURD_CONFIGS: dict[str, tuple[Any, str]] = {
    "width-1e9": ({"width": 10**9}, "width = 1000000000 is out of range"),
    "depth-1e6": ({"depth": 10**6}, "depth = 1000000 is out of range"),
    "classes-1e9": ({"num_classes": 10**9}, "num_classes = 1000000000 is out of range"),
    "image-1e6": ({"image_size": [10**6, 10**6]}, "image_size"),
    "image-0": ({"image_size": [0, 32]}, "image_size"),
    "image-3-sides": ({"image_size": [32, 32, 32]}, "image_size"),
    "heads-do-not-divide": ({"num_heads": 5}, "num_heads = 5 does not divide width 32"),
    "heads-0": ({"num_heads": 0}, "num_heads = 0 is out of range"),
    "patch-0": ({"patch_size": 0}, "patch_size = 0 is out of range"),
    "patch-negative": ({"patch_size": -8}, "patch_size = -8 is out of range"),
    "patch-beyond-image": ({"patch_size": 64}, "patch_size = 64 does not divide"),
    "mlp-1e9": ({"mlp_dim": 10**9}, "mlp_dim"),
    "channels-1e6": ({"in_channels": 10**6}, "in_channels"),
    "width-string": ({"width": "32"}, "width = '32' is not a whole number"),
    "width-fraction": ({"width": 32.5}, "width = 32.5 is not a whole number"),
    "width-bool": ({"width": True}, "width = True is not a whole number"),
    "eps-negative": ({"ln_eps": -1e-6}, "ln_eps"),
    "eps-nan": ({"ln_eps": float("nan")}, "ln_eps = nan"),
    "eps-inf": ({"ln_eps": float("inf")}, "ln_eps"),
    "dropout-nan": ({"dropout": float("nan")}, "dropout = nan"),
    "drop-path-1": ({"drop_path": 1.0}, "drop_path"),
    "class-token-string": ({"class_token": "yes"}, "class_token"),
}


@pytest.mark.parametrize("case", sorted(ABSURD_CONFIGS))
def test_absurd_config_is_refused_before_the_model_is_built(
    tmp_path, tiny_model_file, never_built, case
):
    changes, fragment = ABSURD_CONFIGS[case]
    path = rewrite(tiny_model_file, tmp_path / "m.safetensors", config=changes)
    refused(path, str(path), fragment)


def test_config_not_an_object_or_not_json(tmp_path, tiny_model_file, never_built):
    path = rewrite(tiny_model_file, tmp_path / "list.safetensors", config="[]")
    refused(path, "not a JSON object")
    path = rewrite(tiny_model_file, tmp_path / "text.safetensors", config="{width: 3")
    refused(path, "broken vitcli metadata")


def test_preprocess_that_is_not_an_object(tmp_path, tiny_model_file, never_built):
    path = rewrite(tiny_model_file, tmp_path / "m.safetensors", preprocess="[]")
    refused(path, "preprocessing must be a JSON object, not list")


def test_parameter_limit_refuses_a_config_within_field_bounds(
    tmp_path, tiny_model_file, never_built, monkeypatch
):
    from vitcli.model import ViTConfig
    from vitcli.weights.limits import skeleton

    monkeypatch.setenv("VITCLI_MAX_PARAMETERS", "1000")
    refused(tiny_model_file, "more than vitcli loads (1,000)", "VITCLI_MAX_PARAMETERS")
    with pytest.raises(CheckpointError, match="parameters, more than vitcli loads"):
        skeleton(ViTConfig(**json.loads(tiny_model_file_config(tiny_model_file))), "test")
    monkeypatch.setenv("VITCLI_MAX_PARAMETERS", "lots")
    refused(tiny_model_file, "VITCLI_MAX_PARAMETERS='lots' is not a number")


def tiny_model_file_config(path: Path) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["config"]


BAD_LABELS: dict[str, tuple[Any, str]] = {
    "integers": ([1, 2, 3, 4, 5], "labels must be a list of class names"),
    "mixed": (["cat", 2, "bird", "fish", "frog"], "labels must be a list of class names"),
    "object": ({"0": "cat"}, "labels must be a list of class names"),
    "too-few": (["cat", "dog"], "2 labels for 5 classes"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_labels_that_are_not_one_string_per_class(tmp_path, tiny_model_file, never_built, case):
    labels, fragment = BAD_LABELS[case]
    path = rewrite(tiny_model_file, tmp_path / "m.safetensors", labels=json.dumps(labels))
    refused(path, fragment)


BAD_PREPROCESS: dict[str, tuple[Any, str]] = {
    "std-zero": ({"std": [0.0, 0.5, 0.5]}, "std must be positive"),
    "std-negative": ({"std": [-0.5, 0.5, 0.5]}, "std must be positive"),
    "std-nan": ({"std": [float("nan"), 0.5, 0.5]}, "std must be 3 finite numbers"),
    "mean-nan": ({"mean": [float("nan"), 0.5, 0.5]}, "mean must be 3 finite numbers"),
    "mean-two": ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    "size-zero": ({"size": [0, 32]}, "size 0x32 is out of range"),
    "size-huge": ({"size": [10**6, 10**6]}, "out of range"),
    "size-fraction": ({"size": [32.5, 32]}, "must be numbers"),
    "crop-zero": ({"crop_pct": 0.0}, "crop_pct must be in (0, 1]"),
    "crop-above-one": ({"crop_pct": 1.5}, "crop_pct must be in (0, 1]"),
    "crop-nan": ({"crop_pct": float("nan")}, "crop_pct must be in (0, 1]"),
    "crop-tiny": ({"crop_pct": 1e-9, "resize": "shorter"}, "before the crop"),
    "interpolation": ({"interpolation": "magic"}, "unknown interpolation 'magic'"),
    "interpolation-list": ({"interpolation": ["bilinear"]}, "unknown interpolation"),
    "resize": ({"resize": "stretch"}, "unknown resize mode"),
}


@pytest.mark.parametrize("case", sorted(BAD_PREPROCESS))
def test_invalid_preprocessing_is_refused_at_load(tmp_path, tiny_model_file, never_built, case):
    changes, fragment = BAD_PREPROCESS[case]
    path = rewrite(tiny_model_file, tmp_path / "m.safetensors", preprocess=changes)
    refused(path, str(path), fragment)


def test_preprocess_rejects_bad_values_directly():
    from vitcli.data.preprocess import PIL_RESAMPLE, Preprocess
    from vitcli.errors import InputError

    assert PIL_RESAMPLE == {
        0: "nearest",
        1: "lanczos",
        2: "bilinear",
        3: "bicubic",
        4: "box",
        5: "hamming",
    }
    assert Preprocess(size=224).size == (224, 224)  # type: ignore[arg-type]
    assert Preprocess(size=(32.0, 48)).size == (32, 48)  # type: ignore[arg-type]  # JSON numbers are floats sometimes
    for bad in (dict(size=4097), dict(std=(1, 1, 0)), dict(mean=(float("inf"), 0, 0))):
        with pytest.raises(InputError):
            Preprocess(**bad)


# -- safetensors headers -------------------------------------------------------------------
def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_sparse_4gb_safetensors_is_refused_from_its_header(tmp_path, tiny_model_file):
    """The header declares a 4 GB tensor in a sparse file: refused before any data is read."""
    with safe_open(str(tiny_model_file), framework="pt") as handle:
        metadata = handle.metadata()
    size = 4 * 1024**3
    header = {
        "__metadata__": metadata,
        "blocks.0.mlp.fc1.weight": {"dtype": "F32", "shape": [1024**3], "data_offsets": [0, size]},
    }
    path = tmp_path / "sparse.safetensors"
    head = safetensors_bytes(header)
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(len(head) + size)  # a hole: no disk used, no data to read
    before = max_rss_mb()
    refused(path, "weights do not match the architecture")
    assert max_rss_mb() - before < 200  # the tensor (4 GB) was never read


def test_safetensors_header_lies(tmp_path):
    too_long = tmp_path / "header-beyond-file.safetensors"
    too_long.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    refused(too_long, "header length is beyond the file")
    offsets = tmp_path / "absurd-offsets.safetensors"
    offsets.write_bytes(
        safetensors_bytes(
            {"x": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 8
        )
    )
    refused(offsets, "not a readable safetensors file")
    reversed_offsets = tmp_path / "reversed.safetensors"
    reversed_offsets.write_bytes(
        safetensors_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8)
    )
    refused(reversed_offsets, "not a readable safetensors file")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x00")
    refused(short, "not a readable safetensors file")


def test_safetensors_header_too_large_or_too_many_tensors(tmp_path, monkeypatch):
    huge_header = tmp_path / "huge-header.safetensors"
    with open(huge_header, "wb") as handle:
        handle.write(struct.pack("<Q", 64 * 1024**2))
        handle.truncate(8 + 64 * 1024**2)  # sparse: the header is never parsed
    refused(huge_header, "a safetensors header of 67,108,864 bytes")
    many = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.zeros(1) for i in range(3)}, str(many))
    monkeypatch.setattr("vitcli.weights.readers.MAX_TENSORS", 2)
    refused(many, "3 tensors is more than a model holds")


def test_safetensors_total_is_checked_against_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(100)}, str(path), metadata={"format": "vitcli"})
    monkeypatch.setenv("VITCLI_MAX_PARAMETERS", "50")
    refused(path, "declares 100 numbers, more than vitcli loads (50)")


# -- HF folders ----------------------------------------------------------------------------
def hf_folder(folder: Path, **config) -> Path:
    """A tiny transformers ViT folder written by hand (no transformers needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    width, mlp, classes = 32, 64, 3
    tensors = {
        "vit.embeddings.cls_token": torch.zeros(1, 1, width),
        "vit.embeddings.position_embeddings": torch.zeros(1, 17, width),
        "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(width, 3, 8, 8),
        "vit.embeddings.patch_embeddings.projection.bias": torch.zeros(width),
        "vit.layernorm.weight": torch.ones(width),
        "vit.layernorm.bias": torch.zeros(width),
        "classifier.weight": torch.zeros(classes, width),
        "classifier.bias": torch.zeros(classes),
    }
    block = "vit.encoder.layer.0."
    for part in ("query", "key", "value"):
        tensors[f"{block}attention.attention.{part}.weight"] = torch.zeros(width, width)
        tensors[f"{block}attention.attention.{part}.bias"] = torch.zeros(width)
    for name, shape in {
        "attention.output.dense": (width, width),
        "intermediate.dense": (mlp, width),
        "output.dense": (width, mlp),
    }.items():
        tensors[f"{block}{name}.weight"] = torch.zeros(shape)
        tensors[f"{block}{name}.bias"] = torch.zeros(shape[0])
    for norm in ("layernorm_before", "layernorm_after"):
        tensors[f"{block}{norm}.weight"] = torch.ones(width)
        tensors[f"{block}{norm}.bias"] = torch.zeros(width)
    save_file(tensors, str(folder / "model.safetensors"))
    settings = dict(
        model_type="vit",
        hidden_size=width,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=mlp,
        image_size=32,
        patch_size=8,
        id2label={"0": "a", "1": "b", "2": "c"},
    )
    settings.update(config)
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


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
    "crop-pct": ({"size": {"shortest_edge": 32}, "crop_pct": 0}, "crop_pct"),
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
def timm_folder(folder: Path, tiny_model, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tiny_model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    settings: dict = dict(
        architecture="vit_tiny_patch16_224",
        num_classes=5,
        model_args=dict(
            embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=8, img_size=32
        ),
    )
    settings.update(config)
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


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


# -- npz -----------------------------------------------------------------------------------
def _npy(shape: tuple, dtype: str) -> bytes:
    """A .npy header (version 1.0) declaring `shape`, without data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()  # magic string included


def test_npy_renamed_npz_declaring_1e12_elements(tmp_path):
    path = tmp_path / "ViT-B_16.npz"
    path.write_bytes(_npy((10**12,), "<f4"))
    refused(path, "a single .npy array, not an .npz archive")


def test_npz_member_declaring_1e12_elements(tmp_path):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("embedding/kernel.npy", _npy((10**6, 10**6), "<f4") + b"\0" * 64)
    refused(path, "embedding/kernel", "declares shape (1000000, 1000000)", "the file is corrupt")


@pytest.mark.slow
def test_npz_deflate_bomb_is_refused_before_decompressing(tmp_path):
    """A 256 MB array of zeros deflates to ~250 kB: its header alone gets it refused."""
    width, count = 32, 2**26
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "embedding/kernel.npy", _npy((8, 8, 3, width), "<f4") + bytes(8 * 8 * 3 * width * 4)
        )
        with archive.open("Transformer/encoder_norm/scale.npy", "w", force_zip64=True) as member:
            member.write(_npy((count,), "<f4"))
            chunk = bytes(2**24)
            for _ in range(count * 4 // len(chunk)):
                member.write(chunk)
    assert path.stat().st_size < 2 * 1024**2
    before = max_rss_mb()
    refused(path, "the arrays declare", "but the architecture they describe has")
    assert max_rss_mb() - before < 100  # 256 MB were never inflated


def test_npz_that_infers_an_absurd_width(tmp_path):
    path = tmp_path / "wide.npz"
    savez(path, **{"embedding/kernel": np.zeros((1, 1, 1, 10000), np.float32)})
    refused(path, "width = 10000 is out of range")


def test_npz_of_other_files(tmp_path):
    path = tmp_path / "notes.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    refused(path, "'readme.txt' is not a readable .npy member")


def test_npz_object_array_error_never_advises_allow_pickle(tmp_path):
    path = tmp_path / "objects.npz"
    savez(path, **{"embedding/kernel": np.array([{"code": 1}], dtype=object)})
    refused(path, "holds Python objects")


# -- torch pickles -------------------------------------------------------------------------
def bin_folder(tmp_path: Path, save) -> Path:
    folder = hf_folder(tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    save(tensors, folder / "pytorch_model.bin")
    return folder


def test_torch_bin_loads_memory_mapped(tmp_path):
    bundle = load_model(str(bin_folder(tmp_path, torch.save)))
    assert bundle.extra["weights_file"] == "pytorch_model.bin"


class Payload:
    """Any class instance: weights_only=True refuses to unpickle it."""


def test_torch_bin_errors_never_advise_weights_only_false(tmp_path):
    folder = bin_folder(tmp_path, lambda t, p: torch.save({**t, "x": Payload()}, p))
    refused(folder, "holds objects other than tensors")
    folder = bin_folder(
        tmp_path / "old", lambda t, p: torch.save(t, p, _use_new_zipfile_serialization=False)
    )
    refused(folder, "not a torch zip file")
    binary = folder / "pytorch_model.bin"
    data = (tmp_path / "hf" / "pytorch_model.bin").read_bytes()
    binary.write_bytes(data[: len(data) // 2])
    refused(folder, "pytorch_model.bin")
    folder = bin_folder(tmp_path / "nested", lambda t, p: torch.save([t], p))
    refused(folder, "not a state dict of named tensors")


# -- FIFOs, devices and the CLI ------------------------------------------------------------
def test_device_as_model_is_refused_without_reading():
    refused("/dev/zero", "not a regular file")


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


def vit(*args: object) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.mark.parametrize("command", ["info", "convert"])
def test_cli_reports_hostile_checkpoints_in_one_line(tmp_path, tiny_model_file, command):
    cases = [
        rewrite(tiny_model_file, tmp_path / "wide.safetensors", config={"width": 10**9}),
        rewrite(tiny_model_file, tmp_path / "std.safetensors", preprocess={"std": [0, 0, 0]}),
        Path("/dev/zero"),
    ]
    for path in cases:
        args = (
            ["info", path] if command == "info" else ["convert", path, tmp_path / "o.safetensors"]
        )
        result = vit(*args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_parameter_budget_counts_the_skeleton_not_a_real_model():
    from vitcli.model import ViTConfig
    from vitcli.weights.limits import skeleton

    config = ViTConfig.from_variant("H/14")  # 632M parameters: shapes only, no memory
    before = max_rss_mb()
    shapes = skeleton(config, "test")
    assert sum(math.prod(shape) for shape in shapes.values()) > 600_000_000
    assert max_rss_mb() - before < 100


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
