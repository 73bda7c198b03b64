"""Deletion and insertion curves (Petsiuk et al. 2018): the target's probability as
an explanation map's patches are removed or inserted, most relevant first; `vit score`'s AUCs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model.vit import ViT


def perturbation_baseline(x: torch.Tensor, kind: str, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> what a removed patch shows: the image's mean colour, or a blur."""
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    sigma = patch_size / 2
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(F.conv2d(padded, rows, groups=channels), cols, groups=channels)


@torch.no_grad()
def perturbation_auc(
    model: ViT,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 10,
    baseline: str = "mean",
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion AUC, insertion AUC), each (B,), of the target probability as patches are
    removed (inserted) most relevant first. x (B, C, H, W) normalised, maps (B, Hp, Wp)."""
    batch, channels, height, width = x.shape
    grid_h, grid_w = maps.shape[-2:]
    patch = model.config.patch_size
    num_patches = grid_h * grid_w
    order = torch.argsort(-maps.reshape(batch, num_patches).float(), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_patches).expand(batch, -1))  # B,N: 0 = most relevant
    counts = torch.round(torch.linspace(0, 1, steps + 1) * num_patches).long()  # S+1
    moved = rank[:, None, :] < counts[None, :, None]  # B,S+1,N
    moved = moved.reshape(batch, steps + 1, grid_h, grid_w)  # B,S+1,Hp,Wp
    pixels = moved.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    pixels = F.pad(pixels, (0, width - grid_w * patch, 0, height - grid_h * patch))
    pixels = pixels[:, :, None].to(x.device)  # B,S+1,1,H,W
    base = perturbation_baseline(x, baseline, patch)
    curves = []
    for start_from_image in (True, False):
        if start_from_image:  # deletion
            inputs = torch.where(pixels, base[:, None], x[:, None])
        else:  # insertion
            inputs = torch.where(pixels, x[:, None], base[:, None])
        flat = inputs.reshape(-1, channels, height, width)  # B*(S+1),C,H,W
        probs = torch.cat(
            [model(flat[i : i + chunk]).float().softmax(-1) for i in range(0, len(flat), chunk)]
        ).reshape(batch, steps + 1, -1)
        curve = probs.gather(2, targets.to(probs.device).view(-1, 1, 1).expand(-1, steps + 1, 1))
        curve = curve[..., 0]  # B,S+1
        curves.append(((curve[:, 1:] + curve[:, :-1]) / 2).mean(dim=1).cpu())  # trapezoid
    return curves[0], curves[1]
