"""Class-specific and class-agnostic explanation maps of a ViT, batched (issue 14).

    explain(model, images, "gae", targets="top1", labels=bundle.labels) -> Explanation
        .maps (B, Hp, Wp) over the patch grid, .logits (B, K), .targets (B,) or None

Methods (METHODS): raw and rollout are class-agnostic (one forward, no graph); gae,
attribution and gradcam explain one class per image (one forward and one backward, plus an
LRP pass for attribution). See methods.py and lrp.py for the equations, docs/explain.md for
when to use which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from ..model.vit import ViT
from .lrp import attribution_maps, check_supported
from .methods import (
    Explanation,
    TargetLike,
    frozen,
    gae_maps,
    gradcam_maps,
    prefix_tokens,
    raw_maps,
    readout,
    rollout_maps,
)
from .targets import Target, parse_target, resolve_targets

METHODS = ("raw", "rollout", "gae", "attribution", "gradcam")
CLASS_SPECIFIC = frozenset({"gae", "attribution", "gradcam"})

__all__ = [
    "CLASS_SPECIFIC",
    "METHODS",
    "Explanation",
    "Target",
    "attribution_maps",
    "check_supported",
    "explain",
    "frozen",
    "gae_maps",
    "gradcam_maps",
    "map_function",
    "parse_methods",
    "parse_target",
    "prefix_tokens",
    "raw_maps",
    "readout",
    "resolve_targets",
    "rollout_maps",
]


def parse_methods(specs: Sequence[str] | None) -> tuple[str, ...]:
    """`--method` values (repeatable, comma lists) -> distinct methods in the order given."""
    chosen: list[str] = []
    for spec in specs or ("rollout",):
        for part in str(spec).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in METHODS:
                raise InputError(f"unknown --method {name!r}: use one of {', '.join(METHODS)}")
            if name not in chosen:
                chosen.append(name)
    return tuple(chosen) or ("rollout",)


def map_function(method: str) -> Callable[[ViT, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`fn(model, pixels, targets) -> (B, Hp, Wp)` of a class-specific method, the shape of
    `vit attention`'s plug-in: `register(class_specific("gae", map_function("gae")))`."""
    if method not in CLASS_SPECIFIC:
        raise ValueError(f"{method!r} is not class-specific: use one of {sorted(CLASS_SPECIFIC)}")

    def compute(model: ViT, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return explain(model, pixels, method, targets=targets).maps

    return compute


def explain(
    model: ViT,
    images: torch.Tensor,
    method: str,
    targets: TargetLike | None = None,
    labels: Sequence[str] = (),
    *,
    layer: int = -1,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Maps of one method for a batch of normalised images (B, C, H, W).

    `targets`: (B,) class indices, a Target, or a spec (top1, top2, a label, an index; default
    top1); ignored by raw and rollout, whose Explanation.targets is None. `layer` is raw's
    layer; `head_fusion` and `discard_ratio` are rollout's (head_fusion also raw's).
    """
    if method == "raw":
        return raw_maps(model, images, layer=layer, head_fusion=head_fusion)
    if method == "rollout":
        return rollout_maps(model, images, head_fusion=head_fusion, discard_ratio=discard_ratio)
    target = "top1" if targets is None else targets
    if method == "gae":
        return gae_maps(model, images, target, labels)
    if method == "attribution":
        return attribution_maps(model, images, target, labels)
    if method == "gradcam":
        return gradcam_maps(model, images, target, labels)
    raise InputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
