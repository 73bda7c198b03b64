"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), module names as in timm.

z_0 = [x_cls; x_p^1 E; ...; x_p^N E] + E_pos
z'_l = MSA(LN(z_{l-1})) + z_{l-1}
z_l = MLP(LN(z'_l)) + z'_l
y = LN(z_L^0)  -> head

The families that followed are flags of the same classes (config.py), with timm's module names:
prefix tokens [CLS, dist or registers] before the patches, a position table with or without
prefix rows, CLIP's LN before the blocks, layer scale gammas on both residual branches,
QuickGELU or packed SwiGLU MLPs, and the heads: CLS, mean, CLS+mean, DeiT's two heads,
SigLIP's attention-pooling probe. One file over ~400 lines on purpose: every family is these
same few classes, and splitting them would hide that there is no second model.
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

    def __init__(self, patch_size: int, in_channels: int, width: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(
            in_channels, width, kernel_size=patch_size, stride=patch_size, bias=bias
        )

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


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's approximation of GELU, kept for its checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    """fc1 -> act -> fc2; for "swiglu" fc1 is packed [gate; value] (DINOv2 giant, timm's
    SwiGLUPacked): silu(gate) * value, so fc1 is 2 * mlp_dim wide."""

    def __init__(self, width: int, mlp_dim: int, act: str, dropout: float) -> None:
        super().__init__()
        self.gated = act == "swiglu"
        self.fc1 = nn.Linear(width, 2 * mlp_dim if self.gated else mlp_dim)
        self.act: nn.Module
        if act == "quick_gelu":
            self.act = QuickGELU()
        elif self.gated:
            self.act = nn.SiLU()
        else:
            self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.gated:
            gate, value = x.chunk(2, dim=-1)  # each B,T,mlp_dim
            x = self.act(gate) * value
        else:
            x = self.act(x)
        return self.drop2(self.fc2(self.drop1(x)))


class LayerScale(nn.Module):
    """Per-channel gamma on a residual branch (Touvron et al., CaiT 2021; DeiT III, DINOv2)."""

    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


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
        scale = config.layer_scale
        self.ls1 = LayerScale(config.width, scale) if scale is not None else nn.Identity()
        self.ls2 = LayerScale(config.width, scale) if scale is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.attn(self.norm1(x), return_weights=return_weights)
        x = x + self.drop_path(self.ls1(attn_out))  # z' = MSA(LN(z)) + z; ls1 = 1 unless CaiT
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))  # z = MLP(LN(z')) + z'
        return x, weights


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling (MAP): one learned probe attends over every token,
    then a residual MLP; timm's AttentionPoolLatent names (latent, q, kv, proj, norm, mlp)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        width = config.width
        self.num_heads = config.num_heads
        self.head_dim = width // config.num_heads
        self.scale = self.head_dim**-0.5  # 1 / sqrt(Dh)
        self.latent = nn.Parameter(torch.zeros(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=config.ln_eps)
        self.mlp = MLP(width, config.mlp_dim, act=config.act, dropout=0.0)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, width = x.shape
        q = self.q(self.latent.expand(batch, -1, -1))
        q = q.reshape(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)  # B,nh,1,Dh
        kv = self.kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim)  # B,T,2,nh,Dh
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each B,nh,T,Dh
        weights = None
        if return_weights:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B,nh,1,T
            out = weights @ v  # B,nh,1,Dh
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # B,nh,1,Dh
        out = self.proj(out.transpose(1, 2).reshape(batch, 1, width))  # B,1,D
        out = out + self.mlp(self.norm(out))
        return out[:, 0], weights  # B,D


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(
            config.patch_size, config.in_channels, width, bias=config.patch_bias
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if config.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, width)) if config.dist_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, config.reg_tokens, width)) if config.reg_tokens else None
        )
        pos_rows = config.pos_prefix_tokens + config.num_patches
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_rows, width))
        else:
            # Fixed table kept as a persistent buffer so that files carry it under timm's name.
            self.register_buffer("pos_embed", self._sincos_table(config.grid_size))
        self.pos_drop = nn.Dropout(config.dropout)
        self.norm_pre = nn.LayerNorm(width, eps=config.ln_eps) if config.pre_norm else None
        # Stochastic depth grows linearly with depth (DeiT); plain floats so meta init works.
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, drop_path=rate) for rate in rates)
        # timm's avg-pool layout: the final LN moves after pooling (fc_norm), norm is identity.
        self.norm: nn.Module = (
            nn.Identity() if config.fc_norm else nn.LayerNorm(width, eps=config.ln_eps)
        )
        self.fc_norm = nn.LayerNorm(width, eps=config.ln_eps) if config.fc_norm else None
        self.attn_pool = AttentionPool(config) if config.pool == "map" else None
        self.head: nn.Module = nn.Identity()
        self.head_dist: nn.Module | None = None
        self._make_heads(config.num_classes)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.reset_parameters()

    def _make_heads(self, num_classes: int, device: torch.device | None = None) -> None:
        dim = self.config.pooled_dim
        self.head = nn.Linear(dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        # DeiT distilled: a second head on the dist token; eval logits average both.
        self.head_dist = (
            nn.Linear(dim, num_classes, device=device)
            if num_classes > 0 and self.config.pool == "dist"
            else None
        )

    def _sincos_table(self, grid_size: tuple[int, int]) -> torch.Tensor:
        prefix, width = self.config.pos_prefix_tokens, self.config.width
        return torch.cat([torch.zeros(prefix, width), sincos_2d(grid_size, width)]).unsqueeze(0)

    def reset_parameters(self) -> None:
        """timm-style init: truncated normal 0.02 for linears and embeddings, zero head."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.config.width**-0.5)
        # Patch projection initialised like a linear layer on the flattened patch (JAX lecun).
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        self._zero_heads()

    def _zero_heads(self) -> None:
        # The paper zero-initialises the head for fine-tuning; harmless from scratch.
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    # -- position embedding -------------------------------------------------------------
    def _resample(self, table: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        config = self.config
        return resample_grid(
            table,
            config.grid_size,
            grid_size,
            config.pos_prefix_tokens,
            mode=config.pos_resample,
        )

    def _pos_embed_for(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """The position table for a patch grid, resampled when it differs from the trained one."""
        if tuple(grid_size) == self.config.grid_size:
            return self.pos_embed
        if self.config.pos_embed == "sincos2d":
            return self._sincos_table(grid_size).to(self.pos_embed)
        if self.training or torch.is_grad_enabled():
            return self._resample(self.pos_embed, grid_size)
        key = (int(grid_size[0]), int(grid_size[1]))
        cached = self._pos_cache.get(key)
        if (
            cached is None
            or cached.device != self.pos_embed.device
            or cached.dtype != self.pos_embed.dtype
        ):
            cached = self._resample(self.pos_embed, grid_size)
            self._pos_cache[key] = cached
        return cached

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Change the trained image size for good (fine-tuning at another resolution)."""
        new_config = self.config.replace(image_size=image_size)
        if new_config.grid_size != self.config.grid_size and isinstance(
            self.pos_embed, nn.Parameter
        ):
            self.pos_embed = nn.Parameter(self._resample(self.pos_embed.data, new_config.grid_size))
        elif new_config.grid_size != self.config.grid_size:
            table = self._sincos_table(new_config.grid_size).to(self.pos_embed)
            self.pos_embed = table  # type: ignore[assignment]  # a buffer, not a Parameter
        self.config = new_config
        self._pos_cache.clear()

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier (fine-tuning to another label set), zero-initialised.

        A projection head (CLIP) becomes a classifier; DeiT's two heads are both replaced.
        """
        self.config = self.config.replace(num_classes=num_classes, head_kind="classifier")
        self._make_heads(num_classes, device=self.patch_embed.proj.weight.device)
        self._zero_heads()

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
        """Encoder output after the final LN, (B, T, D), and the chosen layers' softmax weights.

        (With fc_norm the LN comes after pooling instead.) Only the layers in `attn_layers`
        take the explicit attention path; each returns
        (B, nh, T, T) with T = prefix + Hp*Wp and tokens ordered [CLS, dist or registers,
        patch_0, ...] row-major; `config.num_prefix_tokens` counts the prefix.
        """
        explicit = self._layer_indices(attn_layers)
        x, grid_size = self.patch_embed(x)  # B,N,D
        batch = x.shape[0]
        prefix = [
            token.expand(batch, -1, -1)
            for token in (self.cls_token, self.dist_token, self.reg_token)
            if token is not None
        ]
        if self.config.no_embed_class:
            # Position table covers the patches only; prefix tokens carry no position.
            x = torch.cat([*prefix, x + self._pos_embed_for(grid_size)], dim=1)  # B,T,D
        else:
            x = torch.cat([*prefix, x], dim=1) + self._pos_embed_for(grid_size)  # B,T,D
        x = self.pos_drop(x)
        if self.norm_pre is not None:
            x = self.norm_pre(x)  # CLIP's ln_pre; not in the ViT paper
        weights: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks):
            x, layer_weights = block(x, return_weights=index in explicit)
            if layer_weights is not None:
                weights[index] = layer_weights
        return self.norm(x), weights

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def pool(self, tokens: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """The features the head reads, (B, pooled_dim): the family's pooled embedding. `how`
        ("cls", "mean", "cls+mean") reads the tokens another way (`vit embed --pool`), each
        part through fc_norm on its own when there is one."""
        pool = how or self.config.pool
        if pool == "map":
            assert self.attn_pool is not None
            pooled, _ = self.attn_pool(tokens)
            return self.fc_norm(pooled) if self.fc_norm is not None else pooled
        cls = tokens[:, 0]  # B,D: the CLS token
        patches = tokens[:, self.num_prefix_tokens :].mean(dim=1)  # B,D
        parts = {"cls": [cls], "dist": [cls], "mean": [patches], "cls+mean": [cls, patches]}[pool]
        if self.fc_norm is not None and how is not None:
            parts = [self.fc_norm(part) for part in parts]
        pooled = torch.cat(parts, dim=-1)
        return self.fc_norm(pooled) if self.fc_norm is not None and how is None else pooled

    def readout(self, num_tokens: int) -> torch.Tensor | None:
        """(T,): how the logits read the final tokens, when linearly: e_0 (cls), (e_0 + e_1) / 2
        (DeiT: the mean of both heads), 1/N on the patches (mean), half of each (cls+mean).
        None for the MAP probe, whose weights depend on the input (`map_attention`)."""
        pool, prefix = self.config.pool, self.num_prefix_tokens
        if pool == "map":
            return None
        row = torch.zeros(num_tokens)
        row[: 2 if pool == "dist" else 1] = {"cls": 1.0, "dist": 0.5, "cls+mean": 0.5}.get(pool, 0)
        if pool in ("mean", "cls+mean"):
            row[prefix:] = (1.0 if pool == "mean" else 0.5) / (num_tokens - prefix)
        return row

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The image embedding from pooled features: CLIP's projection, else the features."""
        return self.head(features) if self.config.head_kind == "projection" else features

    def map_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """The MAP probe's softmax weights over all tokens, (B, nh, 1, T): SigLIP's class map."""
        if self.attn_pool is None:
            raise ValueError("map_attention needs a model with pool 'map'")
        _, weights = self.attn_pool(tokens, return_weights=True)
        assert weights is not None
        return weights

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.head_dist is not None:
            # DeiT at inference: the mean of the CLS head and the distillation head.
            return (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2
        return self.head(self.pool(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.forward_features(x)
        return self.forward_head(tokens)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The family's image embedding: the projection output for CLIP-style heads, else the
        pooled features before any classifier (CLS after the final LN, MAP output, ...)."""
        tokens, _ = self.forward_features(x)
        return self.project(self.pool(tokens))

    def forward_with_attention(
        self, x: torch.Tensor, layers: Collection[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits plus {layer: (B, nh, T, T) softmax weights} for the chosen layers only."""
        tokens, weights = self.forward_features(x, attn_layers=layers)
        return self.forward_head(tokens), weights

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
