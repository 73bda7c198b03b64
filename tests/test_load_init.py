"""Loading a model from a file skips the random init that the loaded weights overwrite."""

from __future__ import annotations

import torch

from vitcli.model import ViT


def test_a_loaded_model_is_a_plain_vit_built_without_random_init(tiny_model_file, monkeypatch):
    from safetensors.torch import load_file

    from vitcli.weights.resolve import load_model

    def refuse(self) -> None:
        raise AssertionError("random init while loading weights")

    monkeypatch.setattr(ViT, "reset_parameters", refuse)
    model = load_model(str(tiny_model_file)).model
    assert type(model) is ViT and not model.training
    stored = load_file(tiny_model_file)
    state = model.state_dict()
    assert state.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    # Still trainable: every parameter a leaf that asks for gradients.
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())
