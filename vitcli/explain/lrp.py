"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021): LRP relevance times gradient.

    R^(L) = one-hot(t) at the logits; propagate down with the rules below to get, in every
    block b, the relevance R_A_b (B, nh, T, T) of its softmax attention map A_b;
    Ā_b = E_h[(∇A_b ⊙ R_A_b)^+]               ∇A_b = ∂y_t / ∂A_b
    map = r^T (I + Ā_L) ... (I + Ā_1) over the patch columns (rollout from layer 1, unnormalised,
    r the read-out row: e_0 with CLS)

Rules, as in the authors' code (layers_ours.py), batched per image:
- Linear, alpha=1 beta=0 (bias ignored): Z = x⁺W⁺ᵀ + x⁻W⁻ᵀ, S = R / Z,
  R_x = x⁺ ⊙ (S W⁺) + x⁻ ⊙ (S W⁻): only contributions that push the output up.
- LayerNorm, GELU, softmax, dropout: relevance passes unchanged (element-wise, same shape).
- matmul Z = a b (A V, and Q Kᵀ): z-rule on both factors, R_a = a ⊙ (S bᵀ), R_b = b ⊙ (aᵀ S),
  each halved so the pair conserves R.
- add z = a + b (residuals): z-rule, then both parts rescaled so that their sums split the
  image's total relevance in the ratio |Σ R_a| : |Σ R_b| (the authors sum over the whole
  tensor, batch included; we sum per image, which is what their batch-of-one runs meant).
- clone (a residual stream read by a branch): the relevances of both uses add up.
- CLS pooling puts the head's input relevance on token 0; mean pooling is a z-rule over the
  patch tokens (an extension: the paper's ViT has CLS only).

The pass stops at the attention map of block 1: relevance below it (Q, K, the patch
embedding) does not enter the map. Models with parts these rules do not cover (layer scale,
a MAP head, other MLPs) are refused by name; use gae for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from ..errors import InputError
from ..model.vit import Block, ViT
from .forward import Forward
from .methods import weighted_chain

_EPS = 1e-9
_MODEL_PARTS = {"patch_embed", "pos_drop", "blocks", "norm", "head"}
_BLOCK_PARTS = {"norm1": nn.LayerNorm, "attn": nn.Module, "norm2": nn.LayerNorm, "mlp": nn.Module}
_ATTN_PARTS = {
    "qkv": nn.Linear,
    "attn_drop": nn.Dropout,
    "proj": nn.Linear,
    "proj_drop": nn.Dropout,
}
_MLP_PARTS = {
    "fc1": nn.Linear,
    "act": nn.GELU,
    "drop1": nn.Dropout,
    "fc2": nn.Linear,
    "drop2": nn.Dropout,
}


def check_supported(model: ViT) -> None:
    """Refuse, by name, any part of a model the relevance rules do not cover."""

    def fail(what: str) -> None:
        raise InputError(
            f"--method attribution covers the plain ViT block only; this model has {what}: "
            "use --method gae (same idea, gradients only)"
        )

    def check(module: nn.Module, parts: Mapping[str, type], where: str) -> None:
        for name, child in module.named_children():
            if name == "drop_path" or isinstance(child, nn.Identity):
                continue  # identity in eval mode (drop path, layer scale off): relevance passes
            if name not in parts or not isinstance(child, parts[name]):
                fail(f"{where}.{name} ({type(child).__name__})")
        for name, _ in module.named_parameters(recurse=False):
            fail(f"a parameter {where}.{name}")

    pool = getattr(model.config, "pool", "cls")
    if pool == "map":
        fail("a MAP head (an attention-pooling probe, which no relevance rule here covers)")
    if getattr(model.config, "dist_token", False):
        fail("a distillation token (two heads)")
    extra = {
        name for name, child in model.named_children() if not isinstance(child, nn.Identity)
    } - _MODEL_PARTS
    if extra:
        fail(", ".join(sorted(extra)))
    if not isinstance(model.head, nn.Linear):
        fail(f"a head of type {type(model.head).__name__}")
    if pool not in ("cls", "mean"):
        fail(f"pool {pool!r}")
    for index, module in enumerate(model.blocks):
        block = cast(Block, module)
        check(block, _BLOCK_PARTS, f"blocks.{index}")
        check(block.attn, _ATTN_PARTS, f"blocks.{index}.attn")
        check(block.mlp, _MLP_PARTS, f"blocks.{index}.mlp")


# -- the rules ----------------------------------------------------------------------------
def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / (denominator ± eps), and 0 where the denominator is exactly 0."""
    stabilised = denominator + _EPS * torch.where(denominator >= 0, 1.0, -1.0)
    return torch.where(denominator == 0, 0.0, numerator / stabilised)


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """alpha=1, beta=0 through y = x Wᵀ: (..., in) inputs, (..., out) relevance -> (..., in)."""
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    z = x_pos @ w_pos.T + x_neg @ w_neg.T  # the positive part of every output
    s = safe_divide(relevance, z)
    return x_pos * (s @ w_pos) + x_neg * (s @ w_neg)


def lrp_matmul(
    a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """z-rule through Z = a @ b for both factors, each halved (the authors' `/= 2`)."""
    s = safe_divide(relevance, a @ b)
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


def lrp_add(
    a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """z-rule through a + b, then each part rescaled to its share |Σ R_a| : |Σ R_b| per image."""
    s = safe_divide(relevance, a + b)
    r_a, r_b = a * s, b * s
    dims = tuple(range(1, relevance.ndim))
    sum_a, sum_b = r_a.sum(dim=dims, keepdim=True), r_b.sum(dim=dims, keepdim=True)
    total = relevance.sum(dim=dims, keepdim=True)
    both = sum_a.abs() + sum_b.abs()
    r_a = r_a * safe_divide(safe_divide(sum_a.abs(), both) * total, sum_a)
    r_b = r_b * safe_divide(safe_divide(sum_b.abs(), both) * total, sum_b)
    return r_a, r_b


def _block_relevance(
    block: Block, x: torch.Tensor, relevance: torch.Tensor, first: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Relevance (B, T, D) at the block output -> (at its input, of its attention map A).

    The block's forward is recomputed from its input x with its own modules (drop path and
    dropout are identities in eval mode); `first` stops once A's relevance is known.
    """
    attn, mlp = block.attn, block.mlp
    batch, tokens, width = x.shape
    num_heads = attn.num_heads
    head_dim = width // num_heads
    h1 = block.norm1(x)
    qkv = attn.qkv(h1).reshape(batch, tokens, 3, num_heads, head_dim)  # B,T,3,nh,Dh
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B,nh,T,Dh
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B,nh,T,T
    context = weights @ v  # B,nh,T,Dh
    context_cat = context.transpose(1, 2).reshape(batch, tokens, width)  # B,T,D
    attn_out = attn.proj(context_cat)
    x_mid = x + attn_out  # z' = MSA(LN(z)) + z
    h2 = block.norm2(x_mid)
    hidden = mlp.act(mlp.fc1(h2))
    mlp_out = mlp.fc2(hidden)

    r_mid, r_mlp = lrp_add(x_mid, mlp_out, relevance)
    r_hidden = lrp_linear(hidden, mlp.fc2.weight, r_mlp)  # GELU passes it on
    r_mid = r_mid + lrp_linear(h2, mlp.fc1.weight, r_hidden)  # LN2 passes it; clone adds
    r_x, r_attn = lrp_add(x, attn_out, r_mid)
    r_context = lrp_linear(context_cat, attn.proj.weight, r_attn)  # B,T,D
    r_context = r_context.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)
    r_weights, r_v = lrp_matmul(weights, v, r_context)  # B,nh,T,T and B,nh,T,Dh
    if first:
        return None, r_weights
    r_q, r_kt = lrp_matmul(q, k.transpose(-2, -1), r_weights)  # softmax passes it on
    r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v])  # 3,B,nh,T,Dh
    r_qkv = r_qkv.permute(1, 3, 0, 2, 4).reshape(batch, tokens, 3 * width)  # B,T,3D
    r_x = r_x + lrp_linear(h1, attn.qkv.weight, r_qkv)  # LN1 passes it; clone adds
    return r_x, r_weights


def attention_relevance(
    model: ViT,
    block_inputs: Sequence[torch.Tensor],
    final_tokens: torch.Tensor,
    targets: torch.Tensor,
) -> list[torch.Tensor]:
    """LRP from one-hot(targets) down to every block's attention map: L tensors (B, nh, T, T).

    `block_inputs[b]` is block b's input and `final_tokens` the final norm's output (B, T, D).
    """
    prefix = model.num_prefix_tokens
    batch = final_tokens.shape[0]
    head = cast(nn.Linear, model.head)  # check_supported made sure
    one_hot = torch.zeros(batch, head.out_features, dtype=final_tokens.dtype)
    one_hot[torch.arange(batch), targets.cpu()] = 1.0
    one_hot = one_hot.to(final_tokens.device)
    relevance = torch.zeros_like(final_tokens)  # B,T,D
    if model.config.pool == "cls":
        relevance[:, 0] = lrp_linear(final_tokens[:, 0], head.weight, one_hot)
    else:
        patches = final_tokens[:, prefix:]  # B,N,D
        pooled = patches.mean(dim=1)  # B,D
        r_pooled = lrp_linear(pooled, head.weight, one_hot)
        relevance[:, prefix:] = patches / patches.shape[1] * safe_divide(r_pooled, pooled)[:, None]
    # The final LayerNorm passes relevance on unchanged.
    relevances: list[torch.Tensor] = []
    for index in reversed(range(len(model.blocks))):
        r_x, r_weights = _block_relevance(
            cast(Block, model.blocks[index]), block_inputs[index], relevance, first=index == 0
        )
        relevances.append(r_weights)
        if r_x is not None:
            relevance = r_x
    return relevances[::-1]


def attribution(forward: Forward) -> torch.Tensor:
    """Transformer Attribution maps (see the module docstring) from the shared forward: one
    LRP pass and one backward per target. Holds every layer's (B, nh, T, T) relevance until
    the backward."""
    graph = forward.graph
    assert graph is not None and graph.tokens is not None
    check_supported(forward.model)
    with torch.no_grad():
        relevances = attention_relevance(
            forward.model, graph.block_inputs, graph.tokens, forward.targets
        )

    def reduce(index: int, grad: torch.Tensor) -> torch.Tensor:
        return (grad * relevances[index]).clamp(min=0).mean(dim=1)  # B,T,T: E_h[(∇A ⊙ R_A)^+]

    return weighted_chain(forward, reduce)
