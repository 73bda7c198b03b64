"""Explanation maps over the patch grid: raw attention, rollout, GAE and Grad-CAM, batched.

Every method takes normalised images (B, C, H, W) and returns an `Explanation` whose `maps`
are (B, Hp, Wp) with (Hp, Wp) = (H // P, W // P) of the actual input (non-square grids
included), patch k at row k // Wp, column k % Wp. Maps are not normalised: overlays and
scores normalise them as they need.

Prefix tokens. Tokens are [prefix..., patches] with `prefix = model.num_prefix_tokens` (the
config's when the model has no such attribute): CLS, then registers or a distillation token
when a family has them. Every chain keeps all T tokens in its products and slices the patch
columns at the end, so mass that flows through registers is accounted for, never dropped
mid-chain. The chain starts from the classifier's read-out over tokens (`readout`): e_0 for
CLS pooling, (e_0 + e_1) / 2 with a distillation token (eval logits are the mean of both
heads), 1/N on the patches for mean pooling, half e_0 and half 1/N for CLS+mean; with an
attention-pooling (MAP) probe, gae starts from the probe's gradient-weighted attention row.
gradcam reads the patch tokens only, whatever the head.

Gradients. Class-specific methods run in eval mode with every parameter frozen
(requires_grad False, restored afterwards); the input alone requires grad so autograd records
the forward, and gradients are taken only w.r.t. the tensors a method reads (attention
weights, one LayerNorm output). No graph outlives a call. Class-agnostic methods run under
no_grad.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch

from ..errors import InputError
from ..model.vit import Block, ViT

# The attention-map maths lives with `vit attention`; imported here only, so a move of that
# module needs one line changed.
from .maps import (
    cls_maps,
    discard_lowest,
    fuse_heads,
    rollout_rows,
    rollout_seed,
    rollout_step,
    seeded_rollout,
)
from .targets import Target, resolve_targets


@dataclass
class Explanation:
    maps: torch.Tensor  # (B, Hp, Wp) float32 on the CPU, unnormalised, non-negative
    logits: torch.Tensor  # (B, K) from the same forward pass
    targets: torch.Tensor | None  # (B,) explained classes; None for class-agnostic methods


TargetLike = torch.Tensor | str | Target


# -- shared pieces ------------------------------------------------------------------------
def prefix_tokens(model: ViT) -> int:
    """Tokens before the patches: CLS, registers, distillation token."""
    value = getattr(model, "num_prefix_tokens", None)
    if value is None:
        value = model.config.num_prefix_tokens
    return int(value)


def grid_of(model: ViT, images: torch.Tensor) -> tuple[int, int]:
    """(Hp, Wp) of the patch grid the model builds from these images."""
    patch = model.config.patch_size
    return images.shape[-2] // patch, images.shape[-1] // patch


def readout(
    model: ViT,
    batch: int,
    tokens: int,
    like: torch.Tensor,
    probe_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T): how the head reads the final tokens, the row every chain starts from.

    pool "cls": e_0; "dist" (DeiT distilled, eval logits = the mean of the CLS and dist heads):
    (e_0 + e_1) / 2; "mean": 1/N on the patches; "cls+mean" (one linear layer over [CLS;
    patch mean]): half of each; "map" (SigLIP's probe): `probe_row`, the method's own weighting
    of the probe's attention over the tokens (gae: E_h[(∇P ⊙ P)^+]).
    """
    config = model.config
    prefix = prefix_tokens(model)
    row = torch.zeros(batch, tokens, dtype=like.dtype, device=like.device)
    pool = getattr(config, "pool", "cls")
    if pool == "cls":
        row[:, 0] = 1.0
    elif pool == "dist":
        row[:, :2] = 0.5  # DeiT distilled: eval logits = mean of the CLS and dist heads
    elif pool == "mean":
        row[:, prefix:] = 1.0 / (tokens - prefix)
    elif pool == "cls+mean":
        row[:, 0] = 0.5
        row[:, prefix:] = 0.5 / (tokens - prefix)
    elif pool == "map" and probe_row is not None:
        row = probe_row.to(like.dtype)
    else:
        raise InputError(
            f"class-specific maps are not defined for pool {pool!r} with this method; "
            "use --method gae, raw or rollout with this model"
        )
    return row


@contextmanager
def probe_weights(model: ViT) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of a MAP head (SigLIP's attention-pooling probe) also
    records the probe's softmax weights (B, nh, 1, T), in the graph, into the yielded list.
    Nothing is recorded for a model without one."""
    captured: list[torch.Tensor] = []
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        yield captured
        return

    def explicit(module, args, kwargs):
        return args, {**kwargs, "return_weights": True}

    handles = [
        pool.register_forward_pre_hook(explicit, with_kwargs=True),
        pool.register_forward_hook(lambda module, args, output: captured.append(output[1])),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def chain(readout_row: torch.Tensor, bars: Sequence[torch.Tensor]) -> torch.Tensor:
    """readout^T (I + Ā_L) ... (I + Ā_1) as a vector chain, (B, T).

    With R_0 = I and R_b = R_{b-1} + Ā_b R_{b-1}, R_L = (I + Ā_L) ... (I + Ā_1), so its read-out
    row is a chain of vector-matrix products taken from the last layer: O(L T^2), never T^3.
    `bars` are in layer order (B, T, T).
    """
    row = readout_row.unsqueeze(1)  # B,1,T
    for bar in reversed(bars):
        row = row + row @ bar  # B,1,T
    return row[:, 0]


def patch_grid(rows: torch.Tensor, grid_size: tuple[int, int], prefix: int) -> torch.Tensor:
    """(B, T) token values -> (B, Hp, Wp) over the patches, float32 on the CPU."""
    grid_h, grid_w = grid_size
    patches = rows[:, prefix:]  # B,N
    if patches.shape[1] != grid_h * grid_w:
        raise ValueError(f"{patches.shape[1]} patch tokens for a {grid_h}x{grid_w} grid")
    return patches.reshape(-1, grid_h, grid_w).detach().float().cpu()  # row-major grid


@contextmanager
def frozen(model: ViT) -> Iterator[None]:
    """Eval mode and requires_grad False on every parameter for the block; both restored."""
    was_training = model.training
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


def require_head(model: ViT) -> None:
    if not getattr(model.config, "num_classes", 1):
        raise InputError(
            "gae, attribution and gradcam explain a class, and this model has no classifier "
            "head: use --method raw or rollout"
        )


@contextmanager
def recording(model: ViT, images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Frozen model and grad mode on, even inside a caller's no_grad or inference_mode; yields
    the input as the only leaf that records the graph."""
    require_head(model)
    with torch.inference_mode(False), frozen(model), torch.enable_grad():
        # A copy: the caller's tensor may be an inference tensor, which autograd cannot save.
        yield images.detach().clone().requires_grad_(True)


def _target_score(
    logits: torch.Tensor, targets: TargetLike, labels: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the batch of each image's target logit, the (B,) targets).

    Images do not interact in eval mode, so one backward of the sum gives every image the
    gradient of its own target logit.
    """
    indices = resolve_targets(targets, logits, labels)
    score = logits.gather(1, indices.to(logits.device)[:, None]).sum()
    return score, indices


# -- class-agnostic -----------------------------------------------------------------------
def raw_maps(
    model: ViT, images: torch.Tensor, *, layer: int = -1, head_fusion: str = "mean"
) -> Explanation:
    """The CLS query row of one layer's attention, heads fused: A_l[0, prefix:].

    Not renormalised: `vit attention`'s head mean averages each head's row renormalised over
    the patches (mean-pooled models without CLS, and MAP heads: the mean over queries).
    Class-agnostic.
    """
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise InputError(f"--layer {layer} is out of range: this model has {depth} layers")
    prefix = prefix_tokens(model)
    with frozen(model), torch.no_grad():
        logits, weights = model.forward_with_attention(images, layers=[layer])
        heads = cls_maps(weights[layer % depth], grid_of(model, images), prefix)  # B,nh,Hp,Wp
        maps = fuse_heads(heads, head_fusion)  # B,Hp,Wp
    return Explanation(maps=maps.float().cpu(), logits=logits.float().cpu(), targets=None)


def rollout_maps(
    model: ViT,
    images: torch.Tensor,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Attention rollout (Abnar & Zuidema 2020): Ã_b = rownorm(Ā_b + I), map = (Ã_L...Ã_1)[0].

    Exactly `vit attention`'s rollout (same functions): with a MAP head (SigLIP) the chain
    starts from the probe's head-mean row instead of e_0. Class-agnostic.
    """
    depth = len(model.blocks)
    prefix = prefix_tokens(model)
    if getattr(model.config, "pool", "cls") == "map":
        with frozen(model), torch.no_grad():
            tokens, weights = model.forward_features(images, attn_layers=range(depth))
            logits = model.forward_head(tokens)
            probe = model.map_attention(tokens)  # B,nh,1,T
            factors = [
                rollout_step(
                    discard_lowest(fuse_heads(weights[i], head_fusion), discard_ratio, prefix)
                )
                for i in range(depth)
            ]
            seed = rollout_seed(
                model.config, probe, tokens.shape[0], tokens.shape[1], tokens.device
            )
            rows = seeded_rollout(factors, seed)  # B,T
        maps = patch_grid(rows, grid_of(model, images), prefix)
        return Explanation(maps=maps, logits=logits.float().cpu(), targets=None)
    with frozen(model), torch.no_grad():
        logits, weights = model.forward_with_attention(images, layers=range(depth))
        rows = rollout_rows(
            [weights[i] for i in range(depth)],
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            prefix=prefix,
        )  # B,T
    maps = patch_grid(rows, grid_of(model, images), prefix)
    return Explanation(maps=maps, logits=logits.float().cpu(), targets=None)


# -- class-specific -----------------------------------------------------------------------
def gae_maps(
    model: ViT, images: torch.Tensor, targets: TargetLike, labels: Sequence[str] = ()
) -> Explanation:
    """Generic Attention-model Explainability (Chefer, Gur & Wolf, ICCV 2021), eq. 5-6.

        Ā_b = E_h[(∇A_b ⊙ A_b)^+]          ∇A_b = ∂y_t / ∂A_b, y_t the target logit
        R_0 = I,  R_b = R_{b-1} + Ā_b R_{b-1}    (b = 1..L)
        map = r^T R_L over the patch columns   (r = the read-out row: e_0 with CLS)

    With a MAP head (SigLIP: no CLS token; a probe attends over the final tokens) the probe's
    attention P (B, nh, 1, T) is treated as one more attention map, weighted the same way:
    r = E_h[(∇P ⊙ P)^+]. The probe has no residual of its own (its query is a learned latent,
    not a token), so r enters the chain as it is, with no identity added.

    One forward and one backward. Each layer's gradient is reduced to Ā_b (B, T, T) by a hook
    as soon as autograd produces it, so per-head gradients are never all held at once; the
    read-out row of R_L is then a vector chain (see `chain`).
    """
    depth = len(model.blocks)
    prefix = prefix_tokens(model)
    bars: dict[int, torch.Tensor] = {}
    with probe_weights(model) as probes, recording(model, images) as x:
        logits, weights = model.forward_with_attention(x, layers=range(depth))
        score, indices = _target_score(logits, targets, labels)
        for index, attention in weights.items():
            attention.register_hook(_gae_hook(bars, index, attention.detach()))
        if probes:  # B,nh,1,T: r = E_h[(∇P ⊙ P)^+], as any other attention map
            probes[-1].register_hook(_gae_hook(bars, -1, probes[-1].detach()))
        torch.autograd.grad(score, [weights[0]], allow_unused=True)
        del weights, probes
    grid_size = grid_of(model, images)
    batch, tokens = x.shape[0], prefix + grid_size[0] * grid_size[1]
    zero = torch.zeros(batch, tokens, tokens, dtype=logits.dtype, device=logits.device)
    layer_bars = [bars.get(i, zero) for i in range(depth)]  # a layer y_t ignores: Ā = 0
    probe_row = bars[-1][:, 0] if -1 in bars else None  # B,T
    rows = chain(readout(model, batch, tokens, logits, probe_row), layer_bars)
    maps = patch_grid(rows, grid_size, prefix)
    return Explanation(maps=maps, logits=logits.detach().float().cpu(), targets=indices)


def _gae_hook(bars: dict[int, torch.Tensor], index: int, attention: torch.Tensor):
    def hook(grad: torch.Tensor) -> None:
        bars[index] = (grad * attention).clamp(min=0).mean(dim=1)  # B,T,T: E_h[(∇A ⊙ A)^+]

    return hook


def gradcam_maps(
    model: ViT, images: torch.Tensor, targets: TargetLike, labels: Sequence[str] = ()
) -> Explanation:
    """Grad-CAM (Selvaraju et al. 2017) with pytorch-grad-cam's ViT recipe.

        X = LN1 output of the last block on the patch tokens, as (B, D, Hp, Wp)
        α_c = mean over (Hp, Wp) of ∂y_t / ∂X_c
        map = ReLU(Σ_c α_c X_c)

    The last block's norm1 and not its output: the patch tokens of the last output do not
    reach a CLS head, so their gradient is zero. pytorch-grad-cam then min-max scales the
    map per image; we leave that to the overlay.
    """
    prefix = prefix_tokens(model)
    grid_h, grid_w = grid_of(model, images)
    captured: list[torch.Tensor] = []
    norm = cast(Block, model.blocks[-1]).norm1
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with recording(model, images) as x:
            logits = model(x)
            score, indices = _target_score(logits, targets, labels)
            activations = captured[-1]  # B,T,D
            (grad,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    with torch.no_grad():
        acts = activations[:, prefix:].detach()  # B,N,D: patch tokens, row-major grid
        alpha = grad[:, prefix:].mean(dim=1)  # B,D: α_c, the mean over the grid
        cam = (acts * alpha[:, None, :]).sum(dim=-1).clamp(min=0)  # B,N
    maps = cam.reshape(-1, grid_h, grid_w).float().cpu()  # B,Hp,Wp
    return Explanation(maps=maps, logits=logits.detach().float().cpu(), targets=indices)
