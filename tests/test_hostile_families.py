"""Hostile family checkpoints: absurd configs and lying headers for the DeiT/DINOv2/CLIP/SigLIP
loaders (transformers folders, timm folders, DINO .pth, OpenCLIP) each end in one CheckpointError
line naming what is wrong, raised before a model is built or tensor data is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import forbid_building
from safetensors.torch import save_file

from vitcli.errors import CheckpointError
from vitcli.weights.resolve import load_model

WIDTH = 32


@pytest.fixture(autouse=True)
def _no_model_is_built(monkeypatch):
    """Every refusal here must come before a model is allocated."""
    forbid_building(monkeypatch)


def _tiny_tensors() -> dict[str, torch.Tensor]:
    """A few tensors in transformers' DINOv2/CLIP spelling: enough for config inference."""
    return {
        "embeddings.cls_token": torch.zeros(1, 1, WIDTH),
        "embeddings.position_embeddings": torch.zeros(1, 17, WIDTH),
        "embeddings.patch_embeddings.projection.weight": torch.zeros(WIDTH, 3, 8, 8),
        "encoder.layer.0.mlp.fc1.weight": torch.zeros(64, WIDTH),
    }


def _hf_folder(tmp_path, config: dict, tensors: dict | None = None):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    tensors = tensors if tensors is not None else _tiny_tensors()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _one_line_error(reference) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_model(str(reference))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


SMALL = dict(
    hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (dict(SMALL, model_type="dinov2", hidden_size=10**9), "hidden_size = 1000000000"),
        (dict(SMALL, model_type="clip_vision_model", hidden_size=10**9), "hidden_size"),
        (
            dict(model_type="clip", vision_config=dict(SMALL, num_hidden_layers=10**6)),
            "num_hidden_layers",
        ),
        (
            dict(SMALL, model_type="dinov2_with_registers", num_register_tokens=10**9),
            "num_register_tokens = 1000000000",
        ),
        (dict(SMALL, model_type="dinov2", num_attention_heads="many"), "num_attention_heads"),
        (dict(SMALL, model_type="dinov2", layerscale_value=float("nan")), "layerscale_value"),
        (dict(SMALL, model_type="siglip_vision_model", image_size=10**7), "image_size"),
        (dict(SMALL, model_type="deit", num_channels=0), "num_channels"),
        (dict(SMALL, model_type="dinov2", layer_norm_eps=-1), "layer_norm_eps"),
        (dict(SMALL, model_type="dinov2", qkv_bias="yes"), "qkv_bias"),
    ],
)
def test_absurd_hf_family_configs_are_one_line_errors(tmp_path, config, words):
    message = _one_line_error(_hf_folder(tmp_path, config))
    assert words in message and "config field" in message


def test_hf_register_count_disagreeing_with_weights_is_refused(tmp_path):
    tensors = _tiny_tensors() | {"embeddings.register_tokens": torch.zeros(1, 2, WIDTH)}
    config = dict(SMALL, model_type="dinov2_with_registers", num_register_tokens=4)
    message = _one_line_error(_hf_folder(tmp_path, config, tensors))
    assert "num_register_tokens = 4" in message and "2 register tokens" in message


def test_hf_family_weights_of_the_wrong_shape_are_refused_before_reading(tmp_path):
    tensors = _tiny_tensors() | {"encoder.layer.0.mlp.fc2.weight": torch.zeros(WIDTH, 7)}
    message = _one_line_error(_hf_folder(tmp_path, dict(SMALL, model_type="dinov2"), tensors))
    assert "model.safetensors" in message


def _lying_safetensors(path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file whose header declares `shapes` (float32); the data is a sparse hole,
    so a loader that read it would allocate hundreds of MB, and one that checks first does not."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for side in shape:
            size *= side
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little") + blob)
        handle.truncate(8 + len(blob) + offset)


def _timm_folder(tmp_path, arch: str, shapes: dict[str, list[int]], **config):
    folder = tmp_path / "timm"
    folder.mkdir()
    config.setdefault("model_args", {"num_heads": 4})
    (folder / "config.json").write_text(
        json.dumps({"architecture": arch, "pretrained_cfg": {}, **config})
    )
    _lying_safetensors(folder / "model.safetensors", shapes)
    return folder


TIMM_TINY = {
    "cls_token": [1, 1, WIDTH],
    "patch_embed.proj.weight": [WIDTH, 3, 8, 8],
    "pos_embed": [1, 17, WIDTH],
    "blocks.0.mlp.fc1.weight": [64, WIDTH],
    "blocks.0.mlp.fc2.weight": [WIDTH, 64],
}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"pos_embed": [1, 40_000_001, WIDTH]}, "image size"),  # 1.28e9 numbers, sparse
        ({"reg_token": [1, 100_000, WIDTH]}, "reg_tokens"),
        ({"patch_embed.proj.weight": [10_000, 3, 8, 8]}, "embed_dim"),
        ({"pos_embed": [1, 17, 5]}, "pos_embed has shape"),
        ({"blocks.0.mlp.fc2.weight": [WIDTH]}, "not matrices"),
        ({"blocks.1000000.norm1.weight": [WIDTH]}, "depth"),
        ({"blocks.0.attn.qkv.weight": [97, WIDTH]}, "weights do not match"),
    ],
)
def test_timm_family_folder_with_a_lying_header_is_refused(tmp_path, changes, words):
    folder = _timm_folder(tmp_path, "vit_small_patch14_dinov2.lvd142m", TIMM_TINY | changes)
    assert words in _one_line_error(folder)


def test_timm_family_args_are_checked(tmp_path):
    folder = _timm_folder(
        tmp_path,
        "vit_small_patch14_reg4_dinov2",
        TIMM_TINY,
        model_args={"num_heads": 10**9, "img_size": 32},
    )
    assert "num_heads = 1000000000" in _one_line_error(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_are_never_opened_by_family_loaders(tmp_path):
    folder = tmp_path / "timm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_224"}))
    os.mkfifo(folder / "model.safetensors")
    assert "FIFO" in _one_line_error(folder)
    clip = tmp_path / "clip"
    clip.mkdir()
    save_file({"visual.conv1.weight": torch.zeros(WIDTH, 3, 8, 8)}, str(clip / "x.safetensors"))
    (clip / "x.safetensors").rename(clip / "open_clip_model.safetensors")
    os.mkfifo(clip / "open_clip_config.json")
    assert "FIFO" in _one_line_error(clip / "open_clip_model.safetensors")
    os.mkfifo(tmp_path / "dino_pretrain.pth")
    assert "FIFO" in _one_line_error(tmp_path / "dino_pretrain.pth")


def test_openclip_config_with_absurd_heads_is_refused(tmp_path):
    from vitcli.model import ViT, ViTConfig

    config = ViTConfig(
        image_size=32, patch_size=8, width=WIDTH, depth=1, num_heads=4, mlp_dim=64, num_classes=0
    )
    model = ViT(config)
    state = {f"visual.{k}": v for k, v in model.state_dict().items()}
    state = {k.replace("patch_embed.proj", "conv1"): v for k, v in state.items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"vision_cfg": {"heads": "lots"}}})
    )
    assert "heads" in _one_line_error(tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"vision_cfg": {"heads": 10**9}}})
    )
    assert "num_heads = 1000000000" in _one_line_error(tmp_path / "open_clip_model.safetensors")


def test_dino_pth_with_absurd_registers_is_refused(tmp_path):
    state = {
        "cls_token": torch.zeros(1, 1, WIDTH),
        "register_tokens": torch.zeros(1, 300, WIDTH),
        "pos_embed": torch.zeros(1, 17, WIDTH),
        "patch_embed.proj.weight": torch.zeros(WIDTH, 3, 8, 8),
        "blocks.0.mlp.fc1.weight": torch.zeros(64, WIDTH),
        "blocks.0.mlp.fc2.weight": torch.zeros(WIDTH, 64),
        "blocks.0.ls1.gamma": torch.zeros(WIDTH),
    }
    torch.save(state, tmp_path / "dinov2_reg.pth")
    assert "reg_tokens" in _one_line_error(tmp_path / "dinov2_reg.pth")


@pytest.mark.slow
def test_cli_reports_an_absurd_family_config_in_one_line(tmp_path):
    folder = _hf_folder(tmp_path, dict(SMALL, model_type="clip_vision_model", hidden_size=10**9))
    result = subprocess.run(
        [sys.executable, "-m", "vitcli", "info", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hidden_size" in lines[0], result.stderr
