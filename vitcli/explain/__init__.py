"""Explanation maps of a ViT over its patch grid, batched: the maths below the services.

    explain(model, images, "gae", targets="top1", labels=bundle.labels) -> Explanation
        .maps (B, Hp, Wp) over the patch grid, .logits (B, K), .targets (B,) or None

One registry of methods (registry.METHODS: raw, rollout, gae, attribution, gradcam; name ->
what it needs -> its function), one shared forward pass per batch (forward.py), the maths of
attention maps and rollout (maps.py), the per-head query rows (queries.py), targets
(targets.py) and `vit attention`'s per-batch maps (batch.py). docs/explain.md says when to use
which method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import InputError
from .forward import Forward, Method, Request, forward_pass, frozen
from .registry import METHODS, class_specific, parse_methods, register
from .targets import Target, parse_target, resolve_targets

__all__ = [
    "METHODS",
    "Explanation",
    "Forward",
    "Method",
    "Request",
    "Target",
    "class_specific",
    "explain",
    "forward_pass",
    "frozen",
    "parse_methods",
    "parse_target",
    "register",
    "resolve_targets",
]


@dataclass
class Explanation:
    maps: torch.Tensor  # (B, Hp, Wp) float32 on the CPU, unnormalised, non-negative
    logits: torch.Tensor  # (B, K) from the same forward pass
    targets: torch.Tensor | None  # (B,) explained classes; None for class-agnostic methods


def explain(
    model,
    images: torch.Tensor,
    method: str,
    targets: torch.Tensor | str | Target | None = None,
    labels: Sequence[str] = (),
    *,
    layer: int = -1,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Maps of one method for a batch of normalised images (B, C, H, W), one forward pass.

    `targets`: (B,) class indices, a Target, or a spec (top1, top2, a label, an index; default
    top1); ignored by class-agnostic methods, whose Explanation.targets is None. `layer` is
    raw's layer; `head_fusion` and `discard_ratio` are rollout's (head_fusion also raw's).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise InputError(f"--layer {layer} is out of range: this model has {depth} layers")
    chosen = METHODS[method]
    request = Request(
        methods=(chosen,), head_fusion=head_fusion, discard_ratio=discard_ratio, layer=layer
    )
    with frozen(model):
        forward = forward_pass(model, images, request)
    indices = None
    if chosen.class_specific:
        spec = "top1" if targets is None else targets
        indices = resolve_targets(spec, forward.logits, labels)
        forward = replace(forward, targets=indices.to(forward.logits.device))
    with frozen(model):
        maps = chosen.compute(forward)
    return Explanation(
        maps=maps.detach().float().cpu(), logits=forward.logits.float().cpu(), targets=indices
    )
