"""`vit train --model <family checkpoint>`: DeiT, DINOv2 (registers, layer scale) and CLIP
(projection) fine-tune with a new head; weight decay skips prefix tokens, gammas and the MAP
probe; `--linear-probe` trains the head only, on features computed once, resumably, and the
result is a normal vitcli file that `vit predict` reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitcli.errors import OptionError
from vitcli.model import ViT, ViTConfig
from vitcli.services.train import TrainConfig, parameter_groups, read_state, run
from vitcli.weights.format import load_vitcli_file, save_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")
TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)
FAMILIES = {
    "deit": dict(num_classes=5, dist_token=True, pool="dist", family="deit"),
    "dinov2-reg": dict(
        num_classes=0, reg_tokens=2, no_embed_class=True, layer_scale=1e-5, family="dinov2-reg"
    ),
    "clip": dict(
        num_classes=16, pre_norm=True, patch_bias=False, head_kind="projection", family="clip"
    ),
}


# Tiny models on a shared 2-core machine: a second OpenMP thread only adds spin-waiting.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """Images of one bright coloured square (class = colour channel) on dark noise."""
    root = tmp_path_factory.mktemp("data") / "colours"
    rng = np.random.default_rng(0)
    for index, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 70, (40, 40, 3), dtype=np.uint8)
            pixels[10:26, 12:28, index] = 230
            Image.fromarray(pixels).save(root / name / f"{name}{i}.png")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for kind, fields in FAMILIES.items():
        torch.manual_seed(0)
        model = ViT(ViTConfig(**TINY, **fields))
        paths[kind] = save_model(model, folder / f"{kind}.safetensors")
    return paths


def _config(data: Path, out: Path, model: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data), out=str(out), model=str(model), epochs=2, batch_size=8, workers=0, seed=1
    )
    return TrainConfig(**{**fields, **overrides})


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_checkpoints_fine_tune_with_a_new_head(colours, models, tmp_path, kind):
    result = run(_config(colours, tmp_path / "run", models[kind], lr=1e-3))
    assert result.epochs_done == 2 and all(np.isfinite(row["train_loss"]) for row in result.history)
    trained = load_vitcli_file(tmp_path / "run" / "last.safetensors")
    config = trained.config
    assert config.num_classes == 3 and config.head_kind == "classifier"
    assert config.family == FAMILIES[kind]["family"]
    assert trained.labels == sorted(CLASSES)
    source = load_vitcli_file(models[kind]).model.state_dict()
    moved = [
        name
        for name, tensor in trained.model.state_dict().items()
        if not name.startswith("head") and not torch.equal(tensor, source[name])
    ]
    assert "blocks.0.attn.qkv.weight" in moved  # the backbone was fine-tuned too


def test_no_weight_decay_on_prefix_tokens_gammas_and_the_probe():
    config = ViTConfig(**TINY, num_classes=3, reg_tokens=2, layer_scale=1e-5)
    model = ViT(config)
    deit = ViT(ViTConfig(**TINY, num_classes=3, dist_token=True, pool="dist"))
    siglip = ViT(ViTConfig(**TINY, num_classes=3, class_token=False, pool="map"))
    for net, names in [
        (model, ["reg_token", "cls_token", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma"]),
        (deit, ["dist_token"]),
        (siglip, ["attn_pool.latent"]),
    ]:
        decay, no_decay = parameter_groups(net, 0.05)
        free = {id(p) for p in no_decay["params"]}
        parameters = dict(net.named_parameters())
        assert all(id(parameters[name]) in free for name in names)
        assert id(parameters["blocks.0.attn.qkv.weight"]) in {id(p) for p in decay["params"]}


def test_linear_probe_trains_the_head_on_features_computed_once(
    colours, models, tmp_path, monkeypatch
):
    calls = []
    original = ViT.forward_features

    def counting(self, x, attn_layers=()):
        calls.append(x.shape[0])
        return original(self, x, attn_layers)

    monkeypatch.setattr(ViT, "forward_features", counting)
    result = run(_config(colours, tmp_path / "probe", models["dinov2-reg"], linear_probe=True,
                         epochs=3))  # fmt: skip
    assert sum(calls) == 18  # every image once, whatever the number of epochs
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    trained = load_vitcli_file(tmp_path / "probe" / "last.safetensors").model.state_dict()
    source = load_vitcli_file(models["dinov2-reg"]).model.state_dict()
    for name, tensor in trained.items():
        if not name.startswith("head"):
            assert torch.equal(tensor, source[name]), name  # the backbone is frozen
    assert trained["head.weight"].shape == (3, 32) and trained["head.weight"].abs().sum() > 0


def test_linear_probe_resumes_bit_for_bit(colours, models, tmp_path):
    extra = dict(linear_probe=True, epochs=3, val_split=0.34)
    run(_config(colours, tmp_path / "full", models["deit"], **extra))
    first = run(_config(colours, tmp_path / "cut", models["deit"], **extra), stop_after_epoch=1)
    assert first.stopped_early
    resumed = run(TrainConfig(resume=str(tmp_path / "cut")))
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    a, b = read_state(tmp_path / "full" / "state.pt"), read_state(tmp_path / "cut" / "state.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_linear_probe_with_augmentation_keeps_the_backbone_frozen(colours, models, tmp_path):
    run(_config(colours, tmp_path / "aug", models["clip"], linear_probe=True, randaugment=1,
                epochs=1))  # fmt: skip
    trained = load_vitcli_file(tmp_path / "aug" / "last.safetensors").model.state_dict()
    source = load_vitcli_file(models["clip"]).model.state_dict()
    assert torch.equal(trained["blocks.1.mlp.fc2.weight"], source["blocks.1.mlp.fc2.weight"])
    assert trained["head.weight"].shape == (3, 32)  # a classifier on the pooled width


def test_linear_probe_needs_a_checkpoint(colours, tmp_path):
    with pytest.raises(OptionError, match="--linear-probe"):
        run(TrainConfig(data=str(colours), out=str(tmp_path / "x"), model="Ti/16",
                        linear_probe=True))  # fmt: skip


@pytest.mark.slow
def test_cli_linear_probe_then_predict(colours, models, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trained = subprocess.run(
        [sys.executable, "-m", "vitcli", "train", str(colours), "--out", str(out),
         "--model", str(models["clip"]), "--linear-probe", "--epochs", "2", "-w", "0", "-q"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    image = next((colours / "red").iterdir())
    predicted = subprocess.run(
        [sys.executable, "-m", "vitcli", "predict", str(image), "-m",
         str(out / "best.safetensors"), "-f", "jsonl", "-k", "3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert '"label": "red"' in predicted.stdout or '"label": "blue"' in predicted.stdout
