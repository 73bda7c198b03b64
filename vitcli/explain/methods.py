"""The explanation methods over the patch grid: raw attention, rollout, GAE and Grad-CAM.

Each is `function(forward) -> (B, Hp, Wp)` over one shared `forward.Forward`, with
(Hp, Wp) = (H // P, W // P) of the actual input (non-square grids included), patch k at row
k // Wp, column k % Wp. Maps are not normalised: overlays and scores normalise them as they
need. LRP attribution lives in lrp.py.

Prefix tokens. Tokens are [prefix..., patches] (CLS, then registers or a distillation token).
Every chain keeps all T tokens in its products and slices the patch columns at the end, so
mass that flows through registers is accounted for. The class-specific chains start from the
model's read-out over the tokens (`ViT.readout`); with an attention-pooling (MAP) probe, from
the probe's gradient-weighted attention row. Grad-CAM reads the patch tokens only.

Gradients. Class-specific methods take one backward per target from the forward's `Graph`,
only w.r.t. the tensors they read (attention weights, one LayerNorm output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from .forward import Forward, Graph
from .maps import cls_maps, fuse_heads


def readout_row(forward: Forward, tokens: int, probe_row: torch.Tensor | None = None):
    """(B, T): how the head reads the final tokens, the row every chain starts from: the
    model's linear read-out, or `probe_row` (the method's own weighting of a MAP probe)."""
    batch, like = forward.logits.shape[0], forward.logits
    row = forward.model.readout(tokens)
    if row is not None:
        return row.to(like).expand(batch, -1)
    if probe_row is not None:
        return probe_row.to(like.dtype)
    raise InputError(
        f"class-specific maps are not defined for pool {forward.model.config.pool!r} with "
        "this method; use --method gae, raw or rollout with this model"
    )


def chain(readout: torch.Tensor, bars: Sequence[torch.Tensor]) -> torch.Tensor:
    """readout^T (I + Ā_L) ... (I + Ā_1) as a vector chain, (B, T).

    With R_0 = I and R_b = R_{b-1} + Ā_b R_{b-1}, R_L = (I + Ā_L) ... (I + Ā_1), so its read-out
    row is a chain of vector-matrix products taken from the last layer: O(L T^2), never T^3.
    `bars` are in layer order (B, T, T).
    """
    row = readout.unsqueeze(1)  # B,1,T
    for bar in reversed(bars):
        row = row + row @ bar  # B,1,T
    return row[:, 0]


def patch_grid(rows: torch.Tensor, grid_size: tuple[int, int], prefix: int) -> torch.Tensor:
    """(B, T) token values -> (B, Hp, Wp) over the patches."""
    grid_h, grid_w = grid_size
    patches = rows[:, prefix:]  # B,N
    if patches.shape[1] != grid_h * grid_w:
        raise ValueError(f"{patches.shape[1]} patch tokens for a {grid_h}x{grid_w} grid")
    return patches.reshape(-1, grid_h, grid_w)  # row-major grid


def target_score(graph: Graph, targets: torch.Tensor) -> torch.Tensor:
    """The sum over the batch of each image's target logit. Images do not interact in eval
    mode, so one backward of the sum gives every image the gradient of its own target."""
    with torch.inference_mode(False), torch.enable_grad():  # even inside a caller's no_grad
        index = targets.to(graph.logits.device).clone()[:, None]  # not an inference tensor
        return graph.logits.gather(1, index).sum()


def weighted_chain(forward: Forward, reduce, probe_reduce=None) -> torch.Tensor:
    """One backward of the target score; each layer's gradient reduced to Ā_b (B, T, T) by
    `reduce(index, grad)` as soon as autograd makes it (per-head gradients are never all held
    at once); then the read-out row of R_L as a vector chain, as a patch grid."""
    graph = forward.graph
    assert graph is not None  # forward_pass records it for a method that needs "graph"
    depth = forward.model.config.depth
    bars: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def store(grad: torch.Tensor) -> None:
            bars[index] = reduce(index, grad)

        return store

    handles = [graph.weights[i].register_hook(hook(i)) for i in range(depth)]
    if probe_reduce is not None and graph.probe is not None:
        handles.append(graph.probe.register_hook(hook(-1)))
    try:
        torch.autograd.grad(
            target_score(graph, forward.targets),
            [graph.weights[0]],
            retain_graph=True,
            allow_unused=True,
        )
    finally:
        for handle in handles:
            handle.remove()
    batch, tokens = forward.logits.shape[0], graph.weights[0].shape[-1]
    zero = torch.zeros(
        batch, tokens, tokens, dtype=forward.logits.dtype, device=graph.logits.device
    )
    layer_bars = [bars.get(i, zero) for i in range(depth)]  # a layer y_t ignores: Ā = 0
    probe_row = probe_reduce(bars[-1]) if -1 in bars and probe_reduce is not None else None
    with torch.no_grad():
        rows = chain(readout_row(forward, tokens, probe_row), layer_bars)
    return patch_grid(rows, forward.grid_size, forward.prefix)


# -- class-agnostic -----------------------------------------------------------------------
def raw(forward: Forward) -> torch.Tensor:
    """The CLS query row of one layer's attention, heads fused: A_l[0, prefix:].

    Not renormalised (`vit attention`'s per-head maps are: queries.query_arrays). Without a
    CLS token, the mean over the queries.
    """
    request = forward.request
    heads = cls_maps(
        forward.weights[request.layer % forward.model.config.depth],
        forward.grid_size,
        forward.prefix,
    )  # B,nh,Hp,Wp
    return fuse_heads(heads, request.head_fusion)  # B,Hp,Wp


def rollout(forward: Forward) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): Ã_b = rownorm(Ā_b + I), map = (Ã_L...Ã_1)[q]
    with q the class query (e_0; the MAP probe's head-mean row for SigLIP). Class-agnostic."""
    assert forward.rollout_row is not None  # forward_pass makes it for a rollout method
    # All tokens were kept in the product; the patch columns are sliced only now.
    return patch_grid(forward.rollout_row, forward.grid_size, forward.prefix)


# -- class-specific -----------------------------------------------------------------------
def gae(forward: Forward) -> torch.Tensor:
    """Generic Attention-model Explainability (Chefer, Gur & Wolf, ICCV 2021), eq. 5-6.

        Ā_b = E_h[(∇A_b ⊙ A_b)^+]          ∇A_b = ∂y_t / ∂A_b, y_t the target logit
        R_0 = I,  R_b = R_{b-1} + Ā_b R_{b-1}    (b = 1..L)
        map = r^T R_L over the patch columns   (r = the read-out row: e_0 with CLS)

    With a MAP head (SigLIP: no CLS token; a probe attends over the final tokens) the probe's
    attention P (B, nh, 1, T) is treated as one more attention map, weighted the same way:
    r = E_h[(∇P ⊙ P)^+]. The probe has no residual of its own (its query is a learned latent,
    not a token), so r enters the chain as it is, with no identity added.
    """
    graph = forward.graph
    assert graph is not None
    weights = {i: w.detach() for i, w in graph.weights.items()}
    probe = graph.probe.detach() if graph.probe is not None else None

    def reduce(index: int, grad: torch.Tensor) -> torch.Tensor:
        attention = probe if index == -1 else weights[index]
        assert attention is not None
        return (grad * attention).clamp(min=0).mean(dim=1)  # B,T,T: E_h[(∇A ⊙ A)^+]

    return weighted_chain(forward, reduce, probe_reduce=lambda bar: bar[:, 0])  # B,T


def gradcam(forward: Forward) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) with pytorch-grad-cam's ViT recipe.

        X = LN1 output of the last block on the patch tokens, as (B, D, Hp, Wp)
        α_c = mean over (Hp, Wp) of ∂y_t / ∂X_c
        map = ReLU(Σ_c α_c X_c)

    The last block's norm1 and not its output: the patch tokens of the last output do not
    reach a CLS head, so their gradient is zero. pytorch-grad-cam then min-max scales the
    map per image; we leave that to the overlay.
    """
    graph = forward.graph
    assert graph is not None and graph.activations is not None
    activations = graph.activations  # B,T,D
    (grad,) = torch.autograd.grad(
        target_score(graph, forward.targets), activations, retain_graph=True
    )
    prefix = forward.prefix
    with torch.no_grad():
        acts = activations[:, prefix:].detach()  # B,N,D: patch tokens, row-major grid
        alpha = grad[:, prefix:].mean(dim=1)  # B,D: α_c, the mean over the grid
        cam = (acts * alpha[:, None, :]).sum(dim=-1).clamp(min=0)  # B,N
    return cam.reshape(-1, *forward.grid_size)  # B,Hp,Wp
