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

from ..errors import InputError
from .maps import (
    prefix_names,
    rollout_seed,
    seeded_rollout,
)
from .queries import QueryTap, query_arrays, query_names
from .targets import Target

if TYPE_CHECKING:
    from ..services.attention.options import AttentionOptions

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
    # (B, T) seed^T Ã_L ... Ã_1 over all tokens, when a chosen method reads rollout: the seed
    # is the class query (e_0, the MAP probe's row, or the mean row without either)
    rollout_row: torch.Tensor | None = None


MapFunction = Callable[[Forward, "AttentionOptions"], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    compute: MapFunction  # -> (B, Hp, Wp), any float dtype, on any device
    layers: Callable[[int], Iterable[int]] = lambda depth: ()  # weights it needs, given depth
    class_specific: bool = False  # explains forward.targets; runs outside inference mode
    # Reads forward.rollout_row: every layer takes the explicit path, but only its rollout
    # factor (B, T, T) is kept, never the (B, nh, T, T) weights.
    rollout: bool = False


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
    assert forward.rollout_row is not None  # compute_batch makes it for a rollout method
    # All tokens were kept in the product; the patch columns are sliced only now.
    return forward.rollout_row[:, forward.prefix :].reshape(-1, *forward.grid_size)  # B,Hp,Wp


register(Method("rollout", _rollout, rollout=True))


def _explained(method: str) -> Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]:
    """services/explain's batched map of `method`, imported on first use (its own forward and
    backward: nothing here runs unless the method is chosen)."""

    def compute(model: Any, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from . import map_function

        return map_function(method)(model, pixels, targets)

    return compute


for _name in ("gae", "attribution", "gradcam"):
    register(class_specific(_name, _explained(_name)))

# Peak memory per image of a class-specific method over rollout's (docs/explain.md, ViT-B/16 on
# the CPU: rollout 39 MB, gradcam 104, gae 134, attribution 192): each keeps the autograd graph
# of its forward until its backward. A registered method not listed counts as gae.
MEMORY_FACTOR = {"gradcam": 3, "gae": 4, "attribution": 5}


def memory_factor(methods: Sequence[str]) -> int:
    """How many times rollout's memory per image the chosen methods need at their peak."""
    factors = [
        MEMORY_FACTOR.get(name, 4)
        for name in methods
        if name in METHODS and METHODS[name].class_specific
    ]
    return max(factors, default=1)


def target_key(target: Target) -> str:
    """The name a target takes in map names: top1, top2, ... or class<index> (labels may hold
    any character; the label itself is in meta.json)."""
    return f"top{target.rank}" if target.rank is not None else f"class{target.index}"


def class_names(labels: Sequence[str], num_classes: int) -> list[str]:
    return (
        list(labels)
        if len(labels) >= num_classes
        else [
            *labels,
            *(f"class_{i}" for i in range(len(labels), num_classes)),
        ]
    )


def parse_targets(specs: Sequence[str], labels: Sequence[str], num_classes: int) -> list[Target]:
    """`--target` values -> distinct Targets (by map name), in the order given."""
    from . import parse_target

    names = class_names(labels, num_classes)
    targets: dict[str, Target] = {}
    for spec in specs:
        target = parse_target(spec, names)
        targets.setdefault(target_key(target), target)
    return list(targets.values())


def explicit_layers(options: AttentionOptions, depth: int) -> list[int]:
    """The layers that must take the explicit (weights-returning) attention path: those of the
    per-head maps and those the methods declare. `options.layers` must be resolved indices."""
    if options.explore:  # the explorer page embeds every layer
        return list(range(depth))
    needed = {int(index) % depth for index in options.layers} if options.heads else set()
    for name in options.methods:
        needed.update(METHODS[name].layers(depth))
        if METHODS[name].rollout:
            needed.update(range(depth))
    return sorted(needed)


def full_weight_layers(options: AttentionOptions, depth: int) -> list[int]:
    """The layers whose whole (B, nh, T, T) weights are kept for the batch: those a registered
    method declares and, with --explore, every layer. Per-head maps keep only their query rows
    and rollout only its (B, T, T) factors (a DINOv2 grid at 518 has 1370 tokens: all weights
    of all layers would be gigabytes per image)."""
    if options.explore:
        return list(range(depth))
    needed: set[int] = set()
    for name in options.methods:
        needed.update(METHODS[name].layers(depth))
    return sorted(needed)


def compute_batch(
    model: Any, pixels: torch.Tensor, options: AttentionOptions, labels: Sequence[str]
) -> dict[str, Any]:
    """One batch -> maps on the CPU: "heads" (B, L, nh, Hp, Wp), "head_mean" (B, L, Hp, Wp) and
    "prefix_mass" (B, L, nh, P) with `options.heads`, "queries" {name: the same three arrays}
    for the other query rows (DeiT's "dist"; SigLIP's "probe", L = 1), "methods" {map name:
    (B, Hp, Wp)} with "map_info" {map name: (method, target name or None)}, "targets" {target
    name: per image (index, label, p)}, "rollout_prefix_mass" (B, P) with rollout, "masks"
    with a threshold, "attentions" {layer: (B, nh, T, T)} with `explore`, "top", "grid_size",
    "query" (the class query: cls, probe or mean) and "prefix_names".

    Per-head maps are query rows over the patches renormalised to sum 1 (`maps.query_maps`),
    each head's raw mass on the prefix tokens kept apart. A class-agnostic method gives one
    map, named after it; a class-specific one gives one per target, named "<method>.<target>"
    (gae.top1, gae.class3). `options.layers` must be resolved (`parse_layers`). Only
    `explicit_layers` pay for weights, only `full_weight_layers` keep them whole, and only
    class-specific methods build an autograd graph.
    """
    config = model.config
    depth, prefix, patch = config.depth, config.num_prefix_tokens, config.patch_size
    grid_size = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)  # (Hp, Wp) of this input
    layers = [int(index) % depth for index in options.layers]
    names = query_names(config)
    probe_head = config.pool == "map"
    reads_rollout = any(METHODS[name].rollout for name in options.methods)
    keep = set(full_weight_layers(options, depth))
    tap = QueryTap(
        row_layers=set(layers) if options.heads else set(),
        query_rows=None if names == ("mean",) else tuple(range(len(names))),
        rollout=(options.head_fusion.value, options.discard_ratio) if reads_rollout else None,
        depth=depth,
        keep=keep,
        prefix=prefix,
    )
    out: dict[str, Any] = {
        "map_info": {},
        "targets": {},
        "queries": {},
        "query": "probe" if probe_head else names[0],
        "head_query": names[0],
        "prefix_names": prefix_names(config),
    }
    handles = tap.attach(model)
    try:
        with torch.inference_mode():
            tokens, weights = model.forward_features(pixels, attn_layers=sorted(keep))
    finally:
        for handle in handles:
            handle.remove()
    with torch.inference_mode():
        logits = model.forward_head(tokens)
        # SigLIP's class map: the probe's attention over the final tokens (B, nh, 1, T).
        probe = model.map_attention(tokens) if probe_head else None
        for layer, layer_weights in weights.items():
            if layer in tap.row_layers or (reads_rollout and layer not in tap.factors):
                tap.consume(layer, layer_weights)
        if options.heads:
            rows = torch.stack([tap.rows[index] for index in layers], dim=1)  # B,L,nh,Q,T
            for position, name in enumerate(names):
                maps = query_arrays(rows[:, :, :, position], grid_size, prefix, options.threshold)
                if position == 0:
                    out.update(maps)
                else:
                    out["queries"][name] = maps
            if probe is not None:
                out["queries"]["probe"] = query_arrays(
                    probe[:, None, :, 0], grid_size, prefix, options.threshold
                )  # B,1,nh,T rows: one "layer", after the last block
        if options.explore:
            out["attentions"] = {index: weights[index].float().cpu() for index in range(depth)}
        rollout_row = None
        if reads_rollout:
            batch, count = tokens.shape[0], tokens.shape[1]
            seed = rollout_seed(config, probe, batch, count, tokens.device)
            rollout_row = seeded_rollout([tap.factors[i] for i in range(depth)], seed)  # B,T
            out["rollout_prefix_mass"] = rollout_row[:, :prefix].float().cpu()
        del tap
        forward = Forward(
            model=model,
            pixels=pixels,
            logits=logits,
            weights=weights,
            grid_size=grid_size,
            prefix=prefix,
            targets=logits.argmax(dim=-1),
            rollout_row=rollout_row,
        )
        computed: dict[str, torch.Tensor] = {}
        for name in options.methods:
            if not METHODS[name].class_specific:
                computed[name] = METHODS[name].compute(forward, options).float().cpu()
                out["map_info"][name] = (name, None)
        probabilities = logits.float().softmax(dim=-1)
    specific = [name for name in options.methods if METHODS[name].class_specific]
    if specific:
        class_labels = class_names(labels, logits.shape[-1])
        # Gradients allowed here: no inference mode, and tensors autograd may save are copied
        # out of it (inference tensors cannot take part in a backward pass).
        forward = replace(forward, logits=logits.clone(), weights={}, rollout_row=None)
        for target in parse_targets(options.targets, labels, logits.shape[-1]):
            key = target_key(target)
            indices = target.indices(logits).to(logits.device)  # B
            scores = probabilities.gather(1, indices[:, None])[:, 0].cpu()
            out["targets"][key] = [
                (int(i), class_labels[int(i)], float(p)) for i, p in zip(indices.cpu(), scores)
            ]
            aimed = replace(forward, targets=indices.clone())
            for name in specific:
                computed[f"{name}.{key}"] = (
                    METHODS[name].compute(aimed, options).detach().float().cpu()
                )
                out["map_info"][f"{name}.{key}"] = (name, key)
    # Options order: each method's maps together, its targets in --target order.
    order = {name: position for position, name in enumerate(options.methods)}
    out["methods"] = {
        key: computed[key] for key in sorted(computed, key=lambda k: order[out["map_info"][k][0]])
    }
    out["map_info"] = {key: out["map_info"][key] for key in out["methods"]}
    k = min(TOP_K, probabilities.shape[-1])
    scores, indices = probabilities.topk(k, dim=-1)
    class_labels = class_names(labels, probabilities.shape[-1])
    out["top"] = [
        [
            (int(i), class_labels[int(i)] if int(i) < len(labels) else str(int(i)), float(s))
            for s, i in zip(row_s, row_i)
        ]
        for row_s, row_i in zip(scores.cpu(), indices.cpu())
    ]
    out["grid_size"] = grid_size
    return out
