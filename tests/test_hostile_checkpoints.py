"""Hostile checkpoint files: absurd configs and labels in our format, invalid preprocessing,
lying safetensors headers, sparse files, npz bombs, pickles, devices. Each must end in one
CheckpointError line before anything large is allocated, and never pass on a library's advice
to load unsafely. Files are tiny and built here."""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoints import (
    bin_folder,
    forbid_building,
    max_rss_mb,
    refused,
    rewrite,
    savez,
)
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from vitcli.cli import app
from vitcli.errors import CheckpointError
from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if a real (allocating) ViT is constructed: refusals must come first."""
    forbid_building(monkeypatch)


# -- our format: metadata ------------------------------------------------------------------
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


# -- devices, limits and the CLI ----------------------------------------------------------
def test_device_as_model_is_refused_without_reading():
    refused("/dev/zero", "not a regular file")


def test_parameter_budget_counts_the_skeleton_not_a_real_model():
    from vitcli.model import ViTConfig
    from vitcli.weights.limits import skeleton

    config = ViTConfig.from_variant("H/14")  # 632M parameters: shapes only, no memory
    before = max_rss_mb()
    shapes = skeleton(config, "test")
    assert sum(math.prod(shape) for shape in shapes.values()) > 600_000_000
    assert max_rss_mb() - before < 100


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
