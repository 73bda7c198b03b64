"""Position embeddings: fixed 2-D sin/cos tables and resampling of learned ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d(
    grid_size: tuple[int, int], width: int, temperature: float = 10_000.0
) -> torch.Tensor:
    """Fixed 2-D sin/cos embedding, (Hp*Wp, D), rows in row-major patch order.

    A quarter of the channels each encode sin(x), cos(x), sin(y), cos(y) at geometrically
    spaced frequencies (as in big_vision's posemb_sincos_2d and MoCo v3).
    """
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {width}")
    grid_h, grid_w = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    quarter = width // 4
    omega = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega  # (D/4,)
    x = cols.flatten()[:, None] * omega[None, :]  # (N, D/4)
    y = rows.flatten()[:, None] * omega[None, :]  # (N, D/4)
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (N, D)
    return table.float()


def resample_grid(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    mode: str = "bicubic-antialias",
) -> torch.Tensor:
    """Resize a learned (1, prefix + Hp*Wp, D) table to another patch grid.

    The prefix rows are kept as they are; the grid rows are laid out as (Hp, Wp, D) row-major,
    interpolated bicubically in float32 and flattened back. `mode` is the home library's rule:
    "bicubic-antialias" (timm), "bicubic" (transformers), "bicubic-offset" (the DINO and DINOv2
    originals, which pass the scale factor (n + 0.1) / n_old instead of the output size; the
    result differs from a plain resize because the sampling positions follow the factor).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    width = grid.shape[-1]
    old_h, old_w = old_grid
    if grid.shape[1] != old_h * old_w:
        raise ValueError(
            f"position embedding has {grid.shape[1]} grid rows, expected {old_h}x{old_w}"
        )
    dtype = grid.dtype
    grid = grid.reshape(1, old_h, old_w, width).permute(0, 3, 1, 2).float()  # 1,D,Hp,Wp
    if mode == "bicubic-offset":
        factor = ((new_grid[0] + 0.1) / old_h, (new_grid[1] + 0.1) / old_w)
        grid = F.interpolate(grid, scale_factor=factor, mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(
            grid,
            size=tuple(new_grid),
            mode="bicubic",
            antialias=mode == "bicubic-antialias",
            align_corners=False,
        )
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"resampling gave a {tuple(grid.shape[-2:])} grid, not {new_grid}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], width).to(dtype)  # 1,N',D
    return torch.cat([prefix, grid], dim=1)
