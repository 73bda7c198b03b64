"""`vit embed`: the family's pooled embedding per image, in input order, in three formats that
round-trip, with failures recorded and names that are not UTF-8 kept losslessly; and `vit
predict` on a headless model says to use `vit embed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import photo, write_cases

from vitcli.data.loader import image_batches
from vitcli.errors import OptionError
from vitcli.model import ViT, ViTConfig
from vitcli.services import embed as service
from vitcli.weights.format import save_model
from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)
FAMILIES = {
    "vit": dict(num_classes=5),
    "dinov2-reg": dict(
        num_classes=0, reg_tokens=2, no_embed_class=True, layer_scale=1e-5, family="dinov2-reg"
    ),
    "dinov2-classifier": dict(num_classes=3, pool="cls+mean", layer_scale=1.0, family="dinov2"),
    "clip": dict(
        num_classes=16, pre_norm=True, patch_bias=False, act="quick_gelu",
        head_kind="projection", family="clip",
    ),
    "siglip": dict(num_classes=0, class_token=False, pool="map", family="siglip"),
    "deit": dict(num_classes=4, dist_token=True, pool="dist", family="deit"),
}  # fmt: skip


def _model_file(folder: Path, kind: str) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(**TINY, **FAMILIES[kind])
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return save_model(model, folder / f"{kind}.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {kind: _model_file(folder, kind) for kind in FAMILIES}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in (1, 2, 3, 10):
        Image.fromarray(photo(40, 30 + i, seed=i)).save(root / f"img{i}.png")
    return root


def _pixels(bundle, paths: list[str]) -> torch.Tensor:
    (batch,) = list(image_batches(paths, bundle.preprocess, batch_size=len(paths), workers=0))
    assert batch.inputs is not None and not batch.failures
    return batch.inputs


def _embed(model: Path, inputs, output: Path, **fields) -> service.EmbedResult:
    options = service.EmbedOptions(
        output=output, inputs=tuple(str(p) for p in inputs), model=str(model), workers=0, **fields
    )
    return service.run(options)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_embeddings_equal_model_embed(models, photos, tmp_path, kind):
    paths = sorted(str(p) for p in photos.glob("*.png"))
    result = _embed(models[kind], paths, tmp_path / "emb.safetensors", batch_size=3)
    matrix, got_paths, errors = service.read_embeddings(tmp_path / "emb.safetensors")
    bundle = load_model(models[kind])
    with torch.no_grad():
        want = bundle.model.embed(_pixels(bundle, paths)).numpy()
    assert got_paths == paths and errors == []
    assert matrix.shape == want.shape == (len(paths), result.dim)
    np.testing.assert_allclose(matrix, want, atol=1e-5)
    if kind == "clip":
        assert result.dim == 16  # the projection, not the width
    if kind == "dinov2-classifier":
        assert result.dim == 64  # CLS and patch mean


def test_pool_choices_read_the_tokens(models, photos, tmp_path):
    paths = [str(photos / "img1.png"), str(photos / "img2.png")]
    bundle = load_model(models["dinov2-reg"])
    with torch.no_grad():
        tokens, _ = bundle.model.forward_features(_pixels(bundle, paths))
    prefix = bundle.config.num_prefix_tokens  # CLS + 2 registers: left out of the mean
    wants = {
        "cls": tokens[:, 0],
        "mean": tokens[:, prefix:].mean(1),
        "cls+mean": torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], -1),
    }
    for pool, want in wants.items():
        _embed(models["dinov2-reg"], paths, tmp_path / f"{pool}.npy", pool=pool)
        matrix, _, _ = service.read_embeddings(tmp_path / f"{pool}.npy")
        np.testing.assert_allclose(matrix, want.numpy(), atol=1e-5)
    with pytest.raises(OptionError, match="no class token"):
        _embed(models["siglip"], paths, tmp_path / "x.npy", pool="cls")


@pytest.mark.slow
def test_order_failures_and_formats_round_trip(models, photos, tmp_path):
    cases = write_cases(tmp_path / "cases")
    bad = [name for name, error in cases.items() if error is not None][:3]
    weird = tmp_path / os.fsdecode(b"caf\xe9-\xff.png")  # not UTF-8: a lossless name
    Image.fromarray(photo(36, 36, seed=7)).save(weird)
    inputs = [
        str(photos / "img10.png"),
        str(tmp_path / "cases" / bad[0]),
        str(weird),
        str(photos / "img2.png"),
        *(str(tmp_path / "cases" / name) for name in bad[1:]),
        str(photos / "img1.png"),
    ]
    good = [p for p in inputs if "cases" not in p]
    outputs = {}
    for suffix in (".jsonl", ".npy", ".safetensors"):
        output = tmp_path / f"emb{suffix}"
        result = _embed(models["clip"], inputs, output, batch_size=2)
        assert result.summary.failed == len(bad) and result.summary.total == len(inputs)
        outputs[suffix] = service.read_embeddings(output)
    first = outputs[".jsonl"][0]
    for matrix, paths, errors in outputs.values():
        assert paths == good  # input order, failures left out of the matrix
        assert [os.fsencode(p) for p in paths] == [os.fsencode(p) for p in good]
        assert [e["path"] for e in errors] == [p for p in inputs if "cases" in p]
        assert all(e["error"] for e in errors)
        np.testing.assert_array_equal(matrix, first)  # float32 survives JSON exactly
    lines = (tmp_path / "emb.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line)["path"] for line in lines] == inputs
    sidecar = (tmp_path / "emb.npy.paths.jsonl").read_text("utf-8").splitlines()
    assert [json.loads(line).get("row") for line in sidecar] == [
        good.index(p) if p in good else None for p in inputs
    ]


def test_all_failed_writes_an_empty_matrix(models, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = _embed(models["vit"], [tmp_path / "broken.png"], tmp_path / "emb.npy")
    matrix, paths, errors = service.read_embeddings(tmp_path / "emb.npy")
    assert matrix.shape == (0, result.dim) and paths == [] and len(errors) == 1


def test_bad_output_suffix_and_folder_output_are_refused(models, photos, tmp_path):
    # The suffixes vit embed writes are never image suffixes: an input is never overwritten.
    with pytest.raises(OptionError, match=r"\.safetensors, \.npy or \.jsonl"):
        service.EmbedOptions(output=tmp_path / "emb.png")
    (tmp_path / "out.npy").mkdir()
    with pytest.raises(OptionError, match="is a folder"):
        _embed(models["vit"], [photos / "img1.png"], tmp_path / "out.npy")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitcli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_cli_embed_exits_1_when_any_failed_and_writes_the_rest(models, photos, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    output = tmp_path / "emb.safetensors"
    result = _cli(
        "embed", str(photos / "img1.png"), str(tmp_path / "broken.jpg"),
        "-o", str(output), "-m", str(models["dinov2-reg"]), "-w", "0",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "1 of 2 images embedded (32 numbers each), 1 failed" in result.stderr
    assert "Traceback" not in result.stderr
    matrix, paths, errors = service.read_embeddings(output)
    assert matrix.shape == (1, 32) and paths == [str(photos / "img1.png")] and len(errors) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_predict_on_a_headless_model_points_to_embed(models, photos, kind):
    result = _cli("predict", str(photos / "img1.png"), "-m", str(models[kind]), "-f", "jsonl")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "no classifier" in lines[0] and "vit embed" in lines[0]
    assert "vit train --linear-probe" in lines[0]


@pytest.mark.slow
def test_torchrun_two_ranks_embed_in_input_order(models, photos, tmp_path):
    inputs = [str(photos / f"img{i}.png") for i in (1, 2, 3, 10)] + [str(tmp_path / "no.png")]
    output = tmp_path / "emb.safetensors"
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "vitcli", "embed", *inputs, "-o", str(output), "-m", str(models["clip"]),
            "-b", "1", "-w", "0",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 5 images embedded" in result.stderr and "x 2 ranks" in result.stderr
    matrix, paths, errors = service.read_embeddings(output)
    assert paths == inputs[:4] and [e["path"] for e in errors] == inputs[4:]
    single = tmp_path / "single.safetensors"
    _embed(models["clip"], inputs, single)
    np.testing.assert_allclose(matrix, service.read_embeddings(single)[0], atol=1e-5)
