"""Map methods: the named ways of turning one batch into one (B, Hp, Wp) map per image.

Every batch goes through the model once on the explicit attention path (`forward`), which
returns the logits and the softmax weights of the layers that someone asked for: the per-head
maps of `--layer`, and the layers each selected method declares. The per-head maps ("raw")
are always made; each name in `AttentionOptions.methods` then adds one map per image, drawn
beside the original on the sheet and stored under its name in maps.safetensors / meta.json.

A new method plugs in by registering a `Method`:

    def my_map(forward: Forward, options: AttentionOptions) -> torch.Tensor:  # (B, Hp, Wp)
        ...
    register(Method("mine", my_map, layers=lambda depth: range(depth)))

A class-specific method written as `fn(model, pixels, targets) -> (B, Hp, Wp)` (one forward
and backward of its own, e.g. services/explain.py) is wrapped by `class_specific`:

    register(class_specific("gae", explain.gae))

Its map explains `forward.targets` (today each image's top-1 class) and is computed outside
inference mode, so it may use autograd; the shared forward never keeps a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ...errors import InputError
from .maps import cls_maps, mass_mask, rollout_rows

if TYPE_CHECKING:
    from .options import AttentionOptions

TOP_K = 5  # predictions kept per image (meta.json's top5, the sheet header)


@dataclass(frozen=True)
class Forward:
    """One batch after the shared forward pass: what every method may read."""

    model: Any  # the ViT, in eval mode, on the device
    pixels: torch.Tensor  # (B, C, H, W) normalised model input on the device
    logits: torch.Tensor  # (B, classes)
    weights: dict[int, torch.Tensor]  # layer -> (B, nh, T, T) softmax weights, asked-for layers
    grid_size: tuple[int, int]  # (Hp, Wp) of this input
    prefix: int  # tokens before the patches (CLS, registers, ...)
    targets: torch.Tensor  # (B,) class index a class-specific map explains (the top-1)


MapFunction = Callable[[Forward, "AttentionOptions"], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    compute: MapFunction  # -> (B, Hp, Wp), any float dtype, on any device
    layers: Callable[[int], Iterable[int]] = lambda depth: ()  # weights it needs, given depth
    class_specific: bool = False  # explains forward.targets; runs outside inference mode


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def check_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def class_specific(
    name: str, function: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
) -> Method:
    """A `function(model, pixels, targets) -> (B, Hp, Wp)` as a method."""
    return Method(
        name,
        lambda forward, options: function(forward.model, forward.pixels, forward.targets),
        class_specific=True,
    )


def _rollout(forward: Forward, options: AttentionOptions) -> torch.Tensor:
    depth = forward.model.config.depth
    row = rollout_rows(
        [forward.weights[index].float() for index in range(depth)],
        head_fusion=options.head_fusion.value,
        discard_ratio=options.discard_ratio,
        prefix=forward.prefix,
    )  # B,T: the CLS row of R
    return row[:, forward.prefix :].reshape(-1, *forward.grid_size)  # B,Hp,Wp


register(Method("rollout", _rollout, layers=range))


def explicit_layers(options: AttentionOptions, depth: int) -> list[int]:
    """The layers that must take the explicit (weights-returning) attention path: those of the
    per-head maps and those the methods declare. `options.layers` must be resolved indices."""
    needed = {int(index) % depth for index in options.layers}
    for name in options.methods:
        needed.update(METHODS[name].layers(depth))
    return sorted(needed)


def compute_batch(
    model: Any, pixels: torch.Tensor, options: AttentionOptions, labels: Sequence[str]
) -> dict[str, Any]:
    """One batch -> maps on the CPU: "heads" (B, L, nh, Hp, Wp), "head_mean" (B, L, Hp, Wp),
    "methods" {name: (B, Hp, Wp)}, "masks" with a threshold, "top" and "grid_size".

    `options.layers` must be resolved (`parse_layers`). Only `explicit_layers` pay for weights.
    """
    config = model.config
    depth, prefix, patch = config.depth, config.num_prefix_tokens, config.patch_size
    grid_size = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)  # (Hp, Wp) of this input
    layers = [int(index) % depth for index in options.layers]
    with torch.inference_mode():
        logits, weights = model.forward_with_attention(pixels, explicit_layers(options, depth))
        heads = torch.stack(
            [cls_maps(weights[index], grid_size, prefix) for index in layers], dim=1
        )  # B,L,nh,Hp,Wp
        out: dict[str, Any] = {
            "heads": heads.float().cpu(),
            "head_mean": heads.mean(dim=2).float().cpu(),
        }
        forward = Forward(
            model=model,
            pixels=pixels,
            logits=logits,
            weights=weights,
            grid_size=grid_size,
            prefix=prefix,
            targets=logits.argmax(dim=-1),
        )
        out["methods"] = {
            name: METHODS[name].compute(forward, options).float().cpu()
            for name in options.methods
            if not METHODS[name].class_specific
        }
        if options.threshold is not None:
            out["masks"] = mass_mask(heads.float(), options.threshold).to(torch.uint8).cpu()
        probabilities = logits.float().softmax(dim=-1)
    if any(METHODS[name].class_specific for name in options.methods):
        # Gradients allowed here: no inference mode, and tensors autograd may save are copied
        # out of it (inference tensors cannot take part in a backward pass).
        forward = replace(forward, logits=logits.clone(), targets=forward.targets.clone())
        for name in options.methods:
            if METHODS[name].class_specific:
                out["methods"][name] = (
                    METHODS[name].compute(forward, options).detach().float().cpu()
                )
    out["methods"] = {name: out["methods"][name] for name in options.methods}  # options order
    k = min(TOP_K, probabilities.shape[-1])
    scores, indices = probabilities.topk(k, dim=-1)
    out["top"] = [
        [
            (int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), float(s))
            for s, i in zip(row_s, row_i)
        ]
        for row_s, row_i in zip(scores.cpu(), indices.cpu())
    ]
    out["grid_size"] = grid_size
    return out
