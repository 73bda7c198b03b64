"""The maths of attention maps: per-head CLS maps, head fusion, rollout and DINO mass masks.

Pure torch and batched: every function takes a leading batch dimension B and treats each
image on its own (no statistic is shared across a batch).

Conventions (REFERENCE.md section 4):
- tokens are [CLS, patch_0, ..., patch_{N-1}], patch k at row k // Wp, column k % Wp, with
  (Hp, Wp) = (H // P, W // P) of the actual input; never sqrt(N), never (Wp, Hp);
- a per-head map is the CLS query row over the patch keys, A[b, h, 0, 1:];
- rollout (Abnar & Zuidema 2020, Fig. 6 of the ViT paper): per layer fuse the heads, add the
  identity, renormalise rows (keepdim), R = Ã_L ... Ã_1, map = R[0, 1:].

A model without a CLS token (mean pooling) has no CLS row: its maps fall back to the mean
over all query tokens (A.mean over queries, and R's rows averaged), and meta.json says so.

Families (docs/families.md) put more tokens before the patches: [CLS, dist] (DeiT distilled),
[CLS, reg_0, ..., reg_{R-1}] (registers); SigLIP has none and reads the tokens with an
attention-pooling probe. `query_maps` turns a query row over all T keys into a map over the
patches renormalised to sum 1, plus that row's raw mass on each prefix token (registers soak
up attention: the mass says how much). Rollout keeps every token in its product and slices
the patch columns at the end; its seed row is the class query (e_0, or the probe's row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cls_maps(weights: torch.Tensor, grid_size: tuple[int, int], prefix: int) -> torch.Tensor:
    """(B, nh, T, T) softmax weights -> (B, nh, Hp, Wp) maps of the CLS query over the patches.

    Without a CLS token (prefix 0) the map is the mean attention each patch receives over all
    queries, the documented fallback.
    """
    batch, num_heads, tokens, _ = weights.shape
    grid_h, grid_w = grid_size
    if tokens != prefix + grid_h * grid_w:
        raise ValueError(
            f"{tokens} tokens do not match a {grid_h}x{grid_w} grid plus {prefix} prefix tokens"
        )
    if prefix:
        rows = weights[:, :, 0, prefix:]  # B,nh,N: query = CLS, keys = patches
    else:
        rows = weights.mean(dim=2)  # B,nh,N: mean over queries
    return rows.reshape(batch, num_heads, grid_h, grid_w)  # row-major: patch k at (k // Wp, k % Wp)


def prefix_names(config) -> list[str]:
    """Names of the tokens before the patches, in the model's order: CLS, dist, reg_0, ..."""
    names = ["CLS"] if config.class_token else []
    names += ["dist"] if config.dist_token else []
    return names + [f"reg_{i}" for i in range(config.reg_tokens)]


def token_order(config) -> str:
    """meta.json's token order, e.g. "[CLS, reg_0, ..., reg_3, patch_0, ..., patch_{N-1}]"."""
    names = prefix_names(config)
    if config.reg_tokens > 2:  # keep it one line: first and last register
        names = names[: len(names) - config.reg_tokens] + ["reg_0", "...", names[-1]]
    tokens = ", ".join([*names, "patch_0", "...", "patch_{N-1}"])
    return f"[{tokens}]; patch k covers grid row k // Wp, column k % Wp"


def query_maps(
    rows: torch.Tensor, grid_size: tuple[int, int], prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., T) attention rows of one query -> ((..., Hp, Wp) map over the patches summing to 1,
    (..., prefix) the row's raw mass on each prefix token).

    The map is A[q, prefix:] / sum(A[q, prefix:]): the prefix keys' share is taken out and
    reported apart, so heads that park most of their attention on a register still show where
    the rest goes. A row with no mass on the patches at all gives a zero map.
    """
    grid_h, grid_w = grid_size
    if rows.shape[-1] != prefix + grid_h * grid_w:
        raise ValueError(
            f"{rows.shape[-1]} tokens do not match a {grid_h}x{grid_w} grid plus {prefix} "
            "prefix tokens"
        )
    patches = rows[..., prefix:]  # ...,N
    total = patches.sum(dim=-1, keepdim=True)
    renormalised = torch.where(total > 0, patches / total.clamp(min=1e-30), 0.0)
    grid = renormalised.reshape(*rows.shape[:-1], grid_h, grid_w)  # row-major grid
    return grid, rows[..., :prefix]


def fuse_heads(weights: torch.Tensor, fusion: str) -> torch.Tensor:
    """(B, nh, T, T) -> (B, T, T) by mean, max or min over the heads."""
    if fusion == "mean":
        return weights.mean(dim=1)
    if fusion == "max":
        return weights.amax(dim=1)
    if fusion == "min":
        return weights.amin(dim=1)
    raise ValueError(f"unknown head fusion {fusion!r}")


def discard_lowest(fused: torch.Tensor, ratio: float, prefix: int) -> torch.Tensor:
    """Zero the lowest `ratio` of the patch-key entries of every row of every image.

    Per image and per row (vit-explain did it once over the flattened matrix of the first
    image only); the CLS key column is never dropped.
    """
    num_patches = fused.shape[-1] - prefix
    drop = int(ratio * num_patches)
    if drop <= 0:
        return fused
    patches = fused[..., prefix:]  # B,T,N: keys = patches
    _, lowest = patches.topk(drop, dim=-1, largest=False)
    patches = patches.scatter(-1, lowest, 0.0)
    return torch.cat([fused[..., :prefix], patches], dim=-1)


def rollout_step(fused: torch.Tensor) -> torch.Tensor:
    """Ã = (Ā + I) with rows renormalised to sum 1 (keepdim: each row divided by its own sum)."""
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    augmented = fused + eye  # residual connection: half the signal skips the attention
    return augmented / augmented.sum(dim=-1, keepdim=True)


def rollout(
    weights: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    prefix: int = 1,
) -> torch.Tensor:
    """Layer-ordered (B, nh, T, T) weights -> R = Ã_L ... Ã_1, (B, T, T).

    The full matrix, for tests and analysis; maps use `seeded_rollout`, which never forms it.
    """
    result = None
    for layer_weights in weights:  # layer 1 first: each new layer multiplies on the left
        step = rollout_step(
            discard_lowest(fuse_heads(layer_weights, head_fusion), discard_ratio, prefix)
        )
        result = step if result is None else step @ result
    if result is None:
        raise ValueError("rollout needs at least one layer")
    return result


def seeded_rollout(factors: Sequence[torch.Tensor], seed: torch.Tensor) -> torch.Tensor:
    """seed^T Ã_L ... Ã_1, (B, T): the rollout row of any query, as a vector chain.

    `factors` are the layer-ordered rollout steps Ã_b (B, T, T) (`rollout_step`), `seed` the
    (B, T) query row the chain starts from: e_0 for CLS, the MAP probe's head-fused attention
    row for SigLIP (the probe reads the final tokens; it has no residual, so its row enters
    as it is). All T tokens stay in the product; slice the patch columns afterwards.
    """
    row = seed.unsqueeze(1)  # B,1,T
    for step in reversed(factors):  # Ã_L first
        row = row @ step  # B,1,T
    return row[:, 0]


def rollout_seed(
    config, probe: torch.Tensor | None, batch: int, tokens: int, device: torch.device
) -> torch.Tensor:
    """(B, T) row rollout starts from, float32: the MAP probe's head-mean row when `probe`
    (B, nh, 1, T) is given (renormalised: exact for the mean already), e_0 with a CLS token,
    else 1/T (the mean over all queries)."""
    if probe is not None:
        row = probe[:, :, 0].float().mean(dim=1)  # B,T
        return row / row.sum(dim=-1, keepdim=True)
    if config.class_token:
        seed = torch.zeros(batch, tokens, dtype=torch.float32, device=device)
        seed[:, 0] = 1.0  # e_0: the CLS query
        return seed
    return torch.full((batch, tokens), 1.0 / tokens, dtype=torch.float32, device=device)


def mass_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """DINO: per map keep the largest patches whose cumulative (renormalised) mass reaches t.

    (..., Hp, Wp) -> bool of the same shape.
    """
    flat = maps.flatten(-2)  # ...,N
    values, order = flat.sort(dim=-1)  # ascending
    values = values / values.sum(dim=-1, keepdim=True)
    keep_sorted = values.cumsum(dim=-1) > (1.0 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)
