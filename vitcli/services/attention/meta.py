"""meta.json's notes on the query rows and prefix masses, and the sheet's mass line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .batches import ImageAttention

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
