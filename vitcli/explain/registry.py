"""The one registry of explanation methods: name -> what it needs -> its function.

Every method is `function(forward) -> (B, Hp, Wp)` over the shared forward pass
(forward.forward_pass), and declares what that pass must keep for it (`needs`):

- "rollout":     the rollout row seed^T Ã_L ... Ã_1 (only (B, T, T) factors are kept)
- "layer":       the whole softmax weights of the request's `layer` (raw)
- "graph":       the forward's autograd record: logits and every layer's weights (gae)
- "activations": logits and the last block's norm1 output in the graph (gradcam)
- "relevance":   every block's input and the final tokens, for an LRP pass (attribution)

plus `layers(depth)`, the layers whose whole weights it reads. A class-specific method
explains `forward.targets` and is called once per target. A new method is one function and
one `register(Method(...))`; a function `fn(model, pixels, targets)` with its own forward
plugs in through `class_specific(name, fn)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import OptionError
from . import methods
from .forward import Forward, Method
from .lrp import attribution, check_supported
from .targets import Target, parse_target

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def check_method(name: str) -> Method:
    if name not in METHODS:
        raise OptionError(f"unknown --method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def class_specific(
    name: str, function: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
) -> Method:
    """A `function(model, pixels, targets) -> (B, Hp, Wp)` with a forward and backward of its
    own, as a method (it runs outside inference mode, so it may use autograd)."""

    def compute(forward: Forward) -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            pixels = forward.pixels.detach().clone()  # not an inference tensor
            return function(forward.model, pixels, forward.targets.clone())

    return Method(name, compute, class_specific=True)


# Peak memory per image of a class-specific method over rollout's (docs/explain.md, ViT-B/16 on
# the CPU: rollout 39 MB, gradcam 104, gae 134, attribution 192): each keeps the autograd graph
# of the forward until its backward.
register(Method("raw", methods.raw, needs=frozenset({"layer"})))
register(Method("rollout", methods.rollout, needs=frozenset({"rollout"})))
register(Method("gae", methods.gae, class_specific=True, needs=frozenset({"graph"}), memory=4))
register(
    Method(
        "attribution",
        attribution,
        class_specific=True,
        needs=frozenset({"graph", "relevance"}),
        check=check_supported,
        memory=5,
    )
)
register(
    Method(
        "gradcam",
        methods.gradcam,
        class_specific=True,
        needs=frozenset({"activations"}),
        memory=3,
    )
)


def parse_methods(specs: Sequence[str] | None) -> tuple[str, ...]:
    """`--method` values (repeatable, comma lists) -> distinct registered names in the order
    given; () when none is given. An unknown name is a usage error (exit 2)."""
    chosen: list[str] = []
    for spec in specs or ():
        for part in str(spec).split(","):
            name = part.strip().lower()
            if name:
                check_method(name)
                if name not in chosen:
                    chosen.append(name)
    if specs and not chosen:
        raise OptionError(f"--method needs a value: one of {', '.join(METHODS)}")
    return tuple(chosen)


def memory_factor(names: Sequence[str]) -> int:
    """How many times rollout's memory per image the chosen methods need at their peak (a
    registered class-specific method that does not say counts as gae)."""
    factors = [
        METHODS[name].memory if METHODS[name].memory > 1 else 4
        for name in names
        if name in METHODS and METHODS[name].class_specific
    ]
    return max(factors, default=1)


def target_key(target: Target) -> str:
    """The name a target takes in map names: top1, top2, ... or class<index> (labels may hold
    any character; the label itself is in meta.json)."""
    return f"top{target.rank}" if target.rank is not None else f"class{target.index}"


def class_names(labels: Sequence[str], num_classes: int) -> list[str]:
    """The model's labels, padded with class_<i> up to its number of classes."""
    return [*labels, *(f"class_{i}" for i in range(len(labels), num_classes))]


def parse_targets(specs: Sequence[str], labels: Sequence[str], num_classes: int) -> list[Target]:
    """`--target` values -> distinct Targets (by map name), in the order given."""
    names = class_names(labels, num_classes)
    targets: dict[str, Target] = {}
    for spec in specs:
        target = parse_target(spec, names)
        targets.setdefault(target_key(target), target)
    return list(targets.values())
