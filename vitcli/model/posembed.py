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
) -> torch.Tensor:
    """Resize a learned (1, prefix + Hp*Wp, D) table to another patch grid.

    The prefix (CLS) rows are kept as they are; the grid rows are laid out as (Hp, Wp, D)
    row-major, interpolated bicubically with antialiasing and flattened back.
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
    grid = F.interpolate(
        grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], width).to(dtype)  # 1,N',D
    return torch.cat([prefix, grid], dim=1)
