"""The numbers behind the paper's Fig. 7: what the embedding filters, the position table and
the attention heads of a checkpoint have learned.

- `filter_components`: principal components of the patch-embedding filters (Fig. 7 left);
- `position_similarity`: cosine similarity of every patch's position embedding with every
  other patch's (Fig. 7 centre);
- `attention_distance`: the mean attention distance of every head (Fig. 7 right), defined in
  docs/inspect.md and in the function's docstring.

Pure maths on arrays and tensors; no files, no drawing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...model import ViT
from ...model.posembed import sincos_2d

PAPER_COMPONENTS = 28  # Fig. 7 left shows the first 28


@dataclass
class FilterComponents:
    components: np.ndarray  # (k, C, P, P) float32: unit-norm principal directions
    explained_variance: np.ndarray  # (k,) variance along each direction
    explained_variance_ratio: np.ndarray  # (k,) its share of the total variance


def filter_components(weight: np.ndarray, count: int = PAPER_COMPONENTS) -> FilterComponents:
    """PCA of the patch-embedding filters `weight` (D, C, P, P), i.e. patch_embed.proj.weight.

    Each of the D filters is one sample in C*P*P dimensions: centre over the D samples, take
    the SVD X = U S V^T, and the rows of V^T are the components, in order of variance
    S^2 / (D - 1). A component's sign is arbitrary; it is fixed so that its largest
    absolute entry is positive, which makes the output deterministic.
    """
    width, channels, patch_h, patch_w = weight.shape
    samples = np.asarray(weight, dtype=np.float64).reshape(width, -1)  # D, C*P*P
    centred = samples - samples.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)  # vt: min(D, CPP), CPP
    count = min(count, vt.shape[0])
    components = vt[:count]
    peak = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(count), peak])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    variance = singular**2 / max(width - 1, 1)
    total = variance.sum()
    ratio = variance / total if total > 0 else np.zeros_like(variance)
    return FilterComponents(
        components=components.reshape(count, channels, patch_h, patch_w).astype(np.float32),
        explained_variance=variance[:count].astype(np.float32),
        explained_variance_ratio=ratio[:count].astype(np.float32),
    )


def position_table(model: ViT) -> np.ndarray:
    """The position embedding of the patch tokens, (Hp*Wp, D), prefix (CLS) rows excluded.

    A learned table is read from the model; a fixed sin/cos table is computed for the
    trained grid (it is the same table the model adds).
    """
    config = model.config
    if config.pos_embed == "sincos2d":
        return sincos_2d(config.grid_size, config.width).numpy()
    table = model.pos_embed.detach().float().cpu().numpy()[0]  # prefix + N, D
    return table[config.num_prefix_tokens :]


def position_similarity(table: np.ndarray, grid_size: tuple[int, int]) -> np.ndarray:
    """Cosine similarity of every patch's embedding with every other: (Hp, Wp, Hp, Wp).

    `table` is (Hp*Wp, D) in row-major patch order; entry [i, j, r, c] compares the patch
    at row i, column j with the patch at row r, column c. An all-zero row has similarity 0
    with everything (there is no direction to compare).
    """
    grid_h, grid_w = grid_size
    if table.shape[0] != grid_h * grid_w:
        raise ValueError(f"{table.shape[0]} position rows do not match a {grid_h}x{grid_w} grid")
    rows = np.asarray(table, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    similarity = unit @ unit.T  # N, N
    return similarity.reshape(grid_h, grid_w, grid_h, grid_w).astype(np.float32)


def grid_distances(grid_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, N) Euclidean distance in input pixels between patch centres: P * ||g_q - g_k||."""
    grid_h, grid_w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # N, 2 as (row, column)
    return torch.cdist(coords, coords) * patch_size


def attention_distance(
    weights: torch.Tensor,
    grid_size: tuple[int, int],
    patch_size: int,
    num_prefix_tokens: int,
) -> torch.Tensor:
    """Mean attention distance per image and head, (B, nh), in input pixels.

    `weights` are softmax weights (B, nh, T, T), T = prefix + Hp*Wp, rows = queries. Only
    patch queries and patch keys count: the prefix (CLS, registers) rows and columns are
    dropped and every remaining row is renormalised to sum 1 over the patch keys, so
    d(q) = sum_k A[q, k] / sum_k' A[q, k'] * P * ||g_q - g_k||, then averaged over the
    Hp*Wp queries.
    """
    tokens = weights.shape[-1]
    grid_h, grid_w = grid_size
    prefix = num_prefix_tokens
    if tokens != prefix + grid_h * grid_w:
        raise ValueError(
            f"{tokens} tokens do not match a {grid_h}x{grid_w} grid plus {prefix} prefix tokens"
        )
    patches = weights[:, :, prefix:, prefix:].double()  # B,nh,N,N: patch queries, patch keys
    mass = patches.sum(dim=-1, keepdim=True)  # B,nh,N,1
    patches = patches / mass.clamp_min(torch.finfo(torch.float64).tiny)
    distance = grid_distances(grid_size, patch_size).to(patches.device)  # N,N
    per_query = (patches * distance).sum(dim=-1)  # B,nh,N
    return per_query.mean(dim=-1)  # B,nh


def uniform_distance(grid_size: tuple[int, int], patch_size: int) -> float:
    """The mean attention distance of a head that attends uniformly to every patch: the mean
    distance between two patches of the grid (a reference line on the plot)."""
    return float(grid_distances(grid_size, patch_size).mean())
