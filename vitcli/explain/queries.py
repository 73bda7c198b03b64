"""The query rows a per-head map reads, per family: CLS (and DeiT's dist row), the mean over
queries without a CLS token, SigLIP's MAP probe (methods.compute_batch reads it from the
model). `QueryTap` keeps only those rows, and rollout's (B, T, T) factors, while the forward
runs; the rest names and records them: array names, meta.json's notes and prefix masses, the
sheet's mass line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .maps import discard_lowest, fuse_heads, mass_mask, query_maps, rollout_step

if TYPE_CHECKING:
    from ..services.attention.batches import ImageAttention

# What each query row is, for meta.json's "queries".
QUERY_NOTES = {
    "cls": "CLS query row over the patch keys, A[b, h, 0, prefix:], renormalised to sum 1 "
    "over the patches; its raw mass on each prefix token is in prefix_mass",
    "dist": "distillation-token query row, A[b, h, 1, prefix:], renormalised as the CLS maps",
    "probe": "the MAP head's probe (SigLIP attention pooling) over the final tokens, "
    "ViT.map_attention, patch part renormalised to sum 1: the model's class map",
    "mean": "no CLS token: mean over all query tokens of A[b, h, :, prefix:], renormalised "
    "(and the mean row seeds rollout)",
}
# Array names of a query other than the CLS row (maps.safetensors, .npy): dist_heads, ...
QUERY_ARRAYS = {
    "heads": "{}_heads",
    "head_mean": "{}_head_mean",
    "prefix_mass": "{}_prefix_mass",
    "masks": "{}_masks",
}


class QueryTap:
    """Reads each layer's softmax weights as the forward pass makes them and keeps only what
    the outputs need: the query rows (B, nh, Q, T) of the per-head layers and the rollout
    factors Ã_b (B, T, T). Hooks on the blocks' attention switch it to the explicit path and
    drop the weights before the block hands them on, so at most one layer's (B, nh, T, T) is
    alive at a time. The layers in `keep` are left alone (returned whole by the forward) and
    consumed after it."""

    def __init__(
        self,
        *,
        row_layers: set[int],
        query_rows: tuple[int, ...] | None,  # None: the mean over all queries
        rollout: tuple[str, float] | None,  # (head fusion, discard ratio)
        depth: int,
        keep: set[int],
        prefix: int,
    ) -> None:
        self.row_layers, self.query_rows, self.rollout = row_layers, query_rows, rollout
        self.prefix, self.keep = prefix, keep
        self.layers = (row_layers | (set(range(depth)) if rollout else set())) - keep
        self.rows: dict[int, torch.Tensor] = {}
        self.factors: dict[int, torch.Tensor] = {}

    def consume(self, layer: int, weights: torch.Tensor) -> None:
        if layer in self.row_layers:
            if self.query_rows is None:
                self.rows[layer] = weights.mean(dim=2, keepdim=True).float()  # B,nh,1,T
            else:
                self.rows[layer] = weights[:, :, list(self.query_rows)].float()  # B,nh,Q,T
        if self.rollout is not None:
            fusion, ratio = self.rollout
            fused = discard_lowest(fuse_heads(weights.float(), fusion), ratio, self.prefix)
            self.factors[layer] = rollout_step(fused)  # B,T,T

    def attach(self, model: Any) -> list[Any]:
        handles = []
        for index, block in enumerate(model.blocks):
            if index in self.layers:
                handles.append(
                    block.attn.register_forward_pre_hook(_explicit_path, with_kwargs=True)
                )
                handles.append(block.attn.register_forward_hook(self._hook(index)))
        return handles

    def _hook(self, index: int) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> Any:
            out, weights = output
            self.consume(index, weights)
            return out, None  # the block hands on no weights: nothing keeps them

        return hook


def _explicit_path(module: Any, args: Any, kwargs: dict) -> tuple[Any, dict]:
    return args, {**kwargs, "return_weights": True}


def query_names(config: Any) -> tuple[str, ...]:
    """The query rows a per-head map reads: ("cls",), ("cls", "dist") for DeiT distilled,
    ("mean",) without a CLS token (the mean over all queries)."""
    if not config.class_token:
        return ("mean",)
    return ("cls", "dist") if config.dist_token else ("cls",)


def query_arrays(rows: torch.Tensor, grid_size: tuple[int, int], prefix: int, threshold) -> dict:
    """(B, L, nh, T) query rows -> the arrays of one query: heads, head_mean, prefix_mass
    (and masks with a threshold), float32 on the CPU."""
    heads, mass = query_maps(rows, grid_size, prefix)  # B,L,nh,Hp,Wp and B,L,nh,P
    maps = {
        "heads": heads.float().cpu(),
        "head_mean": heads.mean(dim=2).float().cpu(),
        "prefix_mass": mass.float().cpu(),
    }
    if threshold is not None:
        maps["masks"] = mass_mask(heads.float(), threshold).to(torch.uint8).cpu()
    return maps


def _percent(value: float) -> float:
    return round(float(value), 6)


def prefix_mass_meta(result: ImageAttention) -> dict:
    """meta.json's "prefix_mass": per query, per layer and head, the raw attention mass on each
    prefix token and on the patches (they sum to 1), before the map was renormalised."""
    names = result.prefix_names
    sets: list[tuple[str, list, np.ndarray | None]] = [
        (result.head_query, list(result.layers), result.prefix_mass)
    ]
    for name, query in result.queries.items():
        sets.append((name, ["probe"] if name == "probe" else result.layers, query["prefix_mass"]))
    out: dict = {"tokens": names}
    for name, layers, mass in sets:
        if mass is None:
            continue
        entries = []
        for layer, per_layer in zip(layers, mass):  # per_layer: nh,P
            heads = [
                {
                    **{token: _percent(v) for token, v in zip(names, head)},
                    "patches": _percent(1.0 - float(head.sum())),
                }
                for head in per_layer
            ]
            mean = per_layer.mean(axis=0)
            entries.append(
                {
                    "layer": layer,
                    "heads": heads,
                    "head_mean": {
                        **{token: _percent(v) for token, v in zip(names, mean)},
                        "patches": _percent(1.0 - float(mean.sum())),
                    },
                }
            )
        out[name] = entries
    if result.rollout_prefix_mass is not None:
        row = result.rollout_prefix_mass
        out["rollout"] = {
            **{token: _percent(v) for token, v in zip(names, row)},
            "patches": _percent(1.0 - float(row.sum())),
        }
    return out


def mass_note(names: Sequence[str], mass: np.ndarray) -> str:
    """A head's raw attention on the prefix tokens, e.g. "CLS 3% · registers 62%" (registers
    summed): what the renormalised map over the patches leaves out."""
    if not len(names):
        return ""
    groups: dict[str, float] = {}
    for name, value in zip(names, mass):
        group = "registers" if name.startswith("reg_") else name
        groups[group] = groups.get(group, 0.0) + float(value)
    return " · ".join(f"{group} {value:.0%}" for group, value in groups.items())
