"""The query rows a per-head map reads, per family: CLS (and DeiT's dist row), the mean over
queries without a CLS token (SigLIP's MAP probe is read by forward.py). `QueryTap` keeps only
those rows, and rollout's (B, T, T) factors, while the forward runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .maps import discard_lowest, fuse_heads, mass_mask, query_maps, rollout_step


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
        weights = weights.detach()
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
