"""`vit train --amp auto` on a CPU: bf16 autocast only with native bf16, and only when a short
measurement at start-up finds it faster for the model (services/train/amp.py)."""

from __future__ import annotations

import torch
from checkpoints import random_vit

from vitcli.services.train import amp as amp_module
from vitcli.services.train.amp import choose_amp, measure_bf16_speedup

CPU = torch.device("cpu")


def test_never_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(amp_module, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(amp_module, "measure_bf16_speedup", lambda *a: 5.0)  # never asked
    choice = choose_amp("auto", random_vit(), CPU, (32, 32))
    assert not choice.bf16 and "no native bf16" in choice.reason


def test_chosen_by_measurement_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(amp_module, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(amp_module, "measure_bf16_speedup", lambda *a: 1.6)
    faster = choose_amp("auto", random_vit(), CPU, (32, 32))
    assert faster.bf16 and "1.60x" in faster.reason
    monkeypatch.setattr(amp_module, "measure_bf16_speedup", lambda *a: 0.9)
    slower = choose_amp("auto", random_vit(), CPU, (32, 32))
    assert not slower.bf16 and "0.90x" in slower.reason
    assert not choose_amp("off", random_vit(), CPU, (32, 32)).bf16


def test_the_measurement_leaves_the_model_and_the_random_stream_as_they_were():
    model = random_vit().eval()
    model.head.weight.grad = torch.ones_like(model.head.weight)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    speedup = measure_bf16_speedup(model, (32, 32))
    assert speedup > 0 and torch.equal(torch.rand(3), expected)
    assert not model.training and torch.equal(model.head.weight.grad, torch.ones(5, 32))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_resume_trains_as_the_run_began(monkeypatch, tmp_path):
    """The choice is stored in state.pt: a resume that re-timed could choose otherwise and
    would no longer end bit for bit where an uninterrupted run ends."""
    from checkpoints import colour_folder

    from vitcli.services.train import TrainConfig, read_state, run

    data = colour_folder(tmp_path / "data")
    monkeypatch.setattr(amp_module, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(amp_module, "measure_bf16_speedup", lambda *a: 1.6)
    config = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        epochs=2,
        batch_size=4,
        workers=0,
        model="Ti/8",
        image_size=16,
        depth=1,
        width=16,
        num_heads=2,
        mlp_dim=32,
    )
    run(config, stop_after_epoch=1)
    assert read_state(tmp_path / "run" / "state.pt")["bf16"] is True
    monkeypatch.setattr(amp_module, "measure_bf16_speedup", lambda *a: 0.5)  # would say no now
    events: list = []
    run(TrainConfig(resume=str(tmp_path / "run")), on_progress=events.append)
    assert read_state(tmp_path / "run" / "state.pt")["bf16"] is True
    start = next(e for e in events if e.kind == "start")
    assert "as the run began" in start.metrics["amp"]
