"""One batch -> every map `vit attention` draws: the per-head maps of each query row and one
map per method (per target for a class-specific one), from one shared forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .forward import Request, forward_pass, kept_layers
from .maps import prefix_names
from .queries import query_arrays, query_names
from .registry import class_names, parse_targets, target_key

TOP_K = 5  # predictions kept per image (meta.json's top5, the sheet header)


def explicit_layers(request: Request, depth: int) -> list[int]:
    """The layers that take the explicit (weights-returning) attention path: those of the
    per-head maps, those kept whole (`kept_layers`) and, for rollout, all of them."""
    needed = set(request.head_layers) | set(kept_layers(request, depth))
    if any(method.rollout for method in request.methods):
        needed.update(range(depth))  # every layer's rollout factor
    return sorted(needed)


def compute_batch(
    model: Any,
    pixels: torch.Tensor,
    request: Request,
    labels: Sequence[str],
    *,
    targets: Sequence[str] = ("top1",),
    threshold: float | None = None,
) -> dict[str, Any]:
    """One batch -> maps on the CPU: "heads" (B, L, nh, Hp, Wp), "head_mean" (B, L, Hp, Wp) and
    "prefix_mass" (B, L, nh, P) with `request.head_layers`, "queries" {name: the same three
    arrays} for the other query rows (DeiT's "dist"; SigLIP's "probe", L = 1), "methods" {map
    name: (B, Hp, Wp)} with "map_info" {map name: (method, target name or None)}, "targets"
    {target name: per image (index, label, p)}, "rollout_prefix_mass" (B, P) with rollout,
    "masks" with a threshold, "attentions" {layer: (B, nh, T, T)} with `explore`, "top",
    "grid_size", "query" (the class query: cls, probe or mean) and "prefix_names".

    Per-head maps are query rows over the patches renormalised to sum 1 (`maps.query_maps`),
    each head's raw mass on the prefix tokens kept apart. A class-agnostic method gives one
    map, named after it; a class-specific one gives one per target, named "<method>.<target>"
    (gae.top1, gae.class3), all from the same forward.
    """
    config = model.config
    depth, prefix = config.depth, model.num_prefix_tokens
    names = query_names(config)
    forward = forward_pass(model, pixels, request)
    grid_size, logits = forward.grid_size, forward.logits
    out: dict[str, Any] = {
        "map_info": {},
        "targets": {},
        "queries": {},
        "query": "probe" if forward.probe is not None else names[0],
        "head_query": names[0],
        "prefix_names": prefix_names(config),
        "grid_size": grid_size,
    }
    with torch.no_grad():
        if request.head_layers:
            rows = torch.stack([forward.rows[i] for i in request.head_layers], dim=1)  # B,L,nh,Q,T
            for position, name in enumerate(names):
                maps = query_arrays(rows[:, :, :, position], grid_size, prefix, threshold)
                if position == 0:
                    out.update(maps)
                else:
                    out["queries"][name] = maps
            if forward.probe is not None:
                out["queries"]["probe"] = query_arrays(
                    forward.probe[:, None, :, 0], grid_size, prefix, threshold
                )  # B,1,nh,T rows: one "layer", after the last block
        if request.explore:
            out["attentions"] = {i: forward.weights[i].float().cpu() for i in range(depth)}
        if forward.rollout_row is not None:
            out["rollout_prefix_mass"] = forward.rollout_row[:, :prefix].float().cpu()
        probabilities = logits.float().softmax(dim=-1)
    computed: dict[str, torch.Tensor] = {}
    for method in request.methods:
        if not method.class_specific:
            with torch.no_grad():
                computed[method.name] = method.compute(forward).float().cpu()
            out["map_info"][method.name] = (method.name, None)
    specific = [method for method in request.methods if method.class_specific]
    labels_all = class_names(labels, logits.shape[-1])
    if specific:
        for target in parse_targets(targets, labels, logits.shape[-1]):
            key = target_key(target)
            indices = target.indices(logits).to(logits.device)  # B
            scores = probabilities.gather(1, indices[:, None])[:, 0].cpu()
            out["targets"][key] = [
                (int(i), labels_all[int(i)], float(p)) for i, p in zip(indices.cpu(), scores)
            ]
            aimed = replace(forward, targets=indices)
            for method in specific:
                computed[f"{method.name}.{key}"] = method.compute(aimed).detach().float().cpu()
                out["map_info"][f"{method.name}.{key}"] = (method.name, key)
    del forward
    # Request order: each method's maps together, its targets in --target order.
    order = {method.name: position for position, method in enumerate(request.methods)}
    out["methods"] = {
        key: computed[key] for key in sorted(computed, key=lambda k: order[out["map_info"][k][0]])
    }
    out["map_info"] = {key: out["map_info"][key] for key in out["methods"]}
    scores, indices = probabilities.topk(min(TOP_K, probabilities.shape[-1]), dim=-1)
    out["top"] = [
        [
            (int(i), labels_all[int(i)] if int(i) < len(labels) else str(int(i)), float(s))
            for s, i in zip(row_s, row_i)
        ]
        for row_s, row_i in zip(scores.cpu(), indices.cpu())
    ]
    return out
