"""Shared fixtures: tiny random models written to tmp_path (never the bundled model)."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = dict(image_size=32, patch_size=8, num_classes=5, width=32, depth=2, num_heads=4, mlp_dim=64)
TINY_LABELS = ["cat", "dog", "bird", "fish", "frog"]


def tiny_config(**overrides):
    """A tiny ViTConfig (32x32, patch 8, width 32, depth 2, 4 heads, 5 classes) with overrides."""
    from vitcli.model import ViTConfig

    return ViTConfig(**{**TINY, **overrides})


def randomised(config, seed: int = 0, std: float = 0.2):
    """The ViT of `config` with every parameter drawn from N(0, std): attention far from uniform."""
    import torch

    from vitcli.model import ViT

    torch.manual_seed(seed)
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model


def random_vit(seed: int = 0, **overrides):
    return randomised(tiny_config(**overrides), seed=seed)


@pytest.fixture
def tiny_model():
    return random_vit()


@pytest.fixture
def tiny_model_file(tmp_path, tiny_model) -> Path:
    """Our format: a tiny random ViT (32x32, patch 8, width 32, depth 2, 5 labels)."""
    from vitcli.weights.format import save_model

    return save_model(tiny_model, tmp_path / "tiny.safetensors", labels=TINY_LABELS, source="test")


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny models (request it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hf_backend(monkeypatch) -> str:
    """The transformers backend an in-process reference runs: its default (torchvision) where
    torchvision imports, else its PIL fallback. vitcli is told to reproduce that one
    (VITCLI_HF_BACKEND), so the comparison is like for like."""
    import importlib.util

    name = "torchvision" if importlib.util.find_spec("torchvision") else "pil"
    monkeypatch.setenv("VITCLI_HF_BACKEND", name)
    return name
