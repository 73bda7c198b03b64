"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), module names as in timm.

z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos
z'_l = MSA(LN(z_{l-1})) + z_{l-1}
z_l = MLP(LN(z'_l)) + z'_l
y = LN(z_L^0)  -> head
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig
from .posembed import resample_grid, sincos_2d


class PatchEmbed(nn.Module):
    """Split into P x P patches, flatten, project to D: a strided convolution does all three."""

    def __init__(self, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # B,C,H,W -> B,D,Hp,Wp
        grid_size = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid_size  # B,N,D with patches row-major


class Attention(nn.Module):
    """Multi-head self-attention with a fused path and an explicit path that returns weights."""

    def __init__(
        self, width: int, num_heads: int, qkv_bias: bool, attn_dropout: float, dropout: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.scale = self.head_dim**-0.5  # 1 / sqrt(Dh)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # B,T,3,nh,Dh
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B,nh,T,Dh
        weights = None
        if return_weights:
            # Explicit path: softmax(q k^T / sqrt(Dh)) computed here because fused kernels
            # never hand the weights back.
            scores = (q * self.scale) @ k.transpose(-2, -1)  # B,nh,T,T
            weights = scores.softmax(dim=-1)
            out = self.attn_drop(weights) @ v  # B,nh,T,Dh
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )  # B,nh,T,Dh
        out = out.transpose(1, 2).reshape(batch, tokens, width)  # heads concatenated: B,T,D
        return self.proj_drop(self.proj(out)), weights


class MLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, act: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth (not in the ViT paper; DeiT's regulariser), identity in eval mode."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.attn = Attention(
            config.width,
            config.num_heads,
            qkv_bias=config.qkv_bias,
            attn_dropout=config.attn_dropout,
            dropout=config.dropout,
        )
        self.norm2 = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.mlp = MLP(config.width, config.mlp_dim, act=config.act, dropout=config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.norm1(x), return_weights=return_weights)
        x = x + self.drop_path(attn_out)  # z' = MSA(LN(z)) + z
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # z = MLP(LN(z')) + z'
        return x, weights


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, config.width)
        prefix, width = config.num_prefix_tokens, config.width
        if config.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        else:
            self.cls_token = None
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, prefix + config.num_patches, width))
        else:
            # Fixed table kept as a persistent buffer so that files carry it under timm's name.
            table = torch.cat([torch.zeros(prefix, width), sincos_2d(config.grid_size, width)])
            self.register_buffer("pos_embed", table.unsqueeze(0))
        self.pos_drop = nn.Dropout(config.dropout)
        # Stochastic depth grows linearly with depth (DeiT); plain floats so meta init works.
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, drop_path=rate) for rate in rates)
        self.norm = nn.LayerNorm(width, eps=config.ln_eps)
        self.head = (
            nn.Linear(width, config.num_classes) if config.num_classes > 0 else nn.Identity()
        )
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm-style init: truncated normal 0.02 for linears and embeddings, zero head."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch projection initialised like a linear layer on the flattened patch (JAX lecun).
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            # The paper zero-initialises the head for fine-tuning; harmless from scratch.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # -- position embedding -------------------------------------------------------------
    def _pos_embed_for(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """The position table for a patch grid, resampled when it differs from the trained one."""
        if tuple(grid_size) == self.config.grid_size:
            return self.pos_embed
        if self.config.pos_embed == "sincos2d":
            prefix = self.config.num_prefix_tokens
            table = torch.cat(
                [torch.zeros(prefix, self.config.width), sincos_2d(grid_size, self.config.width)]
            )
            return table.unsqueeze(0).to(self.pos_embed)
        if self.training or torch.is_grad_enabled():
            return resample_grid(
                self.pos_embed, self.config.grid_size, grid_size, self.config.num_prefix_tokens
            )
        cached = self._pos_cache.get(tuple(grid_size))
        if (
            cached is None
            or cached.device != self.pos_embed.device
            or cached.dtype != self.pos_embed.dtype
        ):
            cached = resample_grid(
                self.pos_embed, self.config.grid_size, grid_size, self.config.num_prefix_tokens
            )
            self._pos_cache[tuple(grid_size)] = cached
        return cached

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Change the trained image size for good (fine-tuning at another resolution)."""
        new_config = self.config.replace(image_size=image_size)
        if new_config.grid_size != self.config.grid_size and isinstance(
            self.pos_embed, nn.Parameter
        ):
            table = resample_grid(
                self.pos_embed.data,
                self.config.grid_size,
                new_config.grid_size,
                self.config.num_prefix_tokens,
            )
            self.pos_embed = nn.Parameter(table)
        elif new_config.grid_size != self.config.grid_size:
            prefix = self.config.num_prefix_tokens
            table = torch.cat(
                [
                    torch.zeros(prefix, self.config.width),
                    sincos_2d(new_config.grid_size, self.config.width),
                ]
            )
            self.pos_embed = table.unsqueeze(0).to(self.pos_embed)
        self.config = new_config
        self._pos_cache.clear()

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier (fine-tuning to another label set), zero-initialised."""
        self.config = self.config.replace(num_classes=num_classes)
        device = self.norm.weight.device
        self.head = (
            nn.Linear(self.config.width, num_classes, device=device)
            if num_classes > 0
            else nn.Identity()
        )
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._pos_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    # -- forward ------------------------------------------------------------------------
    def _layer_indices(self, layers: Collection[int]) -> set[int]:
        depth = len(self.blocks)
        chosen = set()
        for index in layers:
            if not -depth <= index < depth:
                raise IndexError(f"layer {index} out of range for a model with {depth} layers")
            chosen.add(index % depth)
        return chosen

    def forward_features(
        self, x: torch.Tensor, attn_layers: Collection[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Encoder output after the final LN, (B, T, D), and the softmax weights of the chosen layers.

        Only the layers in `attn_layers` take the explicit attention path; each returns
        (B, nh, T, T) with T = prefix + Hp*Wp and tokens ordered [CLS, patch_0, ...] row-major.
        """
        explicit = self._layer_indices(attn_layers)
        x, grid_size = self.patch_embed(x)  # B,N,D
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # B,1+N,D
        x = self.pos_drop(x + self._pos_embed_for(grid_size))
        weights: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            x, layer_weights = block(x, return_weights=index in explicit)
            if layer_weights is not None:
                weights[index] = layer_weights
        return self.norm(x), weights

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "cls":
            pooled = tokens[:, 0]  # B,D: the CLS token
        else:
            pooled = tokens[:, self.config.num_prefix_tokens :].mean(dim=1)  # B,D
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.forward_features(x)
        return self.forward_head(tokens)

    def forward_with_attention(
        self, x: torch.Tensor, layers: Collection[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits plus {layer: (B, nh, T, T) softmax weights} for the chosen layers only."""
        tokens, weights = self.forward_features(x, attn_layers=layers)
        return self.forward_head(tokens), weights

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
