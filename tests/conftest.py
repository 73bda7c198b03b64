"""Shared fixtures: tiny random models written to tmp_path (never the bundled model). The
builders behind them live in tests/checkpoints.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoints import TINY_LABELS, random_vit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
