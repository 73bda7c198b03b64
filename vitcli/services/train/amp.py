"""`--amp auto`: whether a run trains under bf16 autocast, decided where it runs.

On a CUDA GPU with bf16: yes. On a CPU with native bf16 (AVX512-BF16 or AMX, as oneDNN
reports it): only when it is faster for this model, which depends on its size (measured on a
Zen 4 with 2 threads: an S/16 step 1.6x faster in bf16, a Ti/16 step 0.9x, because for small
matrices the casts cost more than the bf16 products save), so it is timed: a few
forward-backward passes on random inputs each way, interleaved, before training starts. On a
CPU without native bf16, never (it is emulated, at under 1 GFLOP/s). The reason is said in the
run's start-up line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...runtime import cpu_has_fast_bf16

# Images per timed pass: enough rows (x tokens) for the matrix shapes of training, few enough
# that a B/16 decides in seconds.
PROBE_BATCH = 4
PROBE_ROUNDS = 2  # timed passes each way, after one warm-up each
# bf16 must be this much faster to be chosen (a tie keeps float32, the reference's numbers).
MIN_SPEEDUP = 1.1


@dataclass(frozen=True)
class AmpChoice:
    bf16: bool
    reason: str  # for the start-up line, e.g. "bf16 autocast: 1.6x float32 on this CPU"


def choose_amp(
    amp: str,
    model: torch.nn.Module,
    device: torch.device,
    image_size: tuple[int, int],
    cached_features: bool = False,
) -> AmpChoice:
    """`amp` "off" or "auto" -> whether to train under bf16 autocast on `device`, and why.
    `cached_features`: a linear probe whose backbone runs once, before training (nothing to
    time on a CPU: its steps are the heads')."""
    if amp != "auto":
        return AmpChoice(False, "float32 (--amp off)")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return AmpChoice(True, "bf16 autocast (CUDA)")
        return AmpChoice(False, "float32 (this GPU has no bf16)")
    if device.type != "cpu":
        return AmpChoice(False, f"float32 (no bf16 autocast on {device.type})")
    if not cpu_has_fast_bf16():
        return AmpChoice(False, "float32 (this CPU has no native bf16)")
    if cached_features:
        return AmpChoice(False, "float32 (linear probe on features computed once)")
    speedup = measure_bf16_speedup(model, image_size)
    if speedup >= MIN_SPEEDUP:
        return AmpChoice(True, f"bf16 autocast: measured {speedup:.2f}x float32's step speed")
    return AmpChoice(False, f"float32: bf16 autocast measured {speedup:.2f}x, not faster")


def measure_bf16_speedup(model: torch.nn.Module, image_size: tuple[int, int]) -> float:
    """float32 time / bf16 autocast time of a forward-backward pass on random inputs. Leaves
    the model's parameters, gradients, mode and the random number generator as they were."""
    rng = torch.get_rng_state()
    was_training = model.training
    grads = [p.grad for p in model.parameters()]
    x = torch.randn(PROBE_BATCH, 3, *image_size)
    times: dict[bool, list[float]] = {False: [], True: []}
    model.train()
    model.zero_grad(set_to_none=True)  # the saved gradients must not be added to
    try:
        for round_ in range(PROBE_ROUNDS + 1):
            for bf16 in (False, True):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(x).float().square().mean()
                if loss.requires_grad:  # a frozen backbone (linear probe) only runs forward
                    loss.backward()
                if round_:  # the first of each is a warm-up
                    times[bf16].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
    finally:
        for parameter, grad in zip(model.parameters(), grads):
            parameter.grad = grad
        model.train(was_training)
        torch.set_rng_state(rng)
    return min(times[False]) / min(times[True])
