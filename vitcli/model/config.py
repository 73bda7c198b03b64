"""The model configuration: one frozen dataclass plus the paper's variant table.

Every field maps one to one onto a CLI option and onto the JSON stored in the metadata of
our weight files, so a file fully describes the network that reads it. The ViT families that
followed the paper (DeiT, DINO, DINOv2, CLIP, SigLIP) are a few more fields here, as timm
expresses them with one VisionTransformer; every new field defaults to the 2020 ViT, so files
written before the fields existed load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

# Paper Table 1 (B, L, H) and the AugReg paper (Ti, S): (depth, width, mlp_dim, num_heads).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
}
PATCH_SIZES = (8, 14, 16, 32)
POS_EMBEDS = ("learned", "sincos2d")
# cls: the CLS token; mean: the patch tokens' average; cls+mean: both concatenated (DINOv2
# classifiers); map: attention-pooling probe (SigLIP); dist: DeiT's two heads on CLS and dist.
POOLS = ("cls", "mean", "cls+mean", "map", "dist")
ACTS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")
HEAD_KINDS = ("classifier", "projection")
# How a learned table is resampled to another grid, as each home library does it:
# bicubic-antialias (timm, DINOv2 with registers), bicubic (transformers' ViT, DeiT, CLIP,
# SigLIP, DINOv2), bicubic-offset (DINO and DINOv2 originals: scale factor (n + 0.1) / n_old).
POS_RESAMPLES = ("bicubic-antialias", "bicubic", "bicubic-offset")

_VARIANT_RE = re.compile(r"^(Ti|S|B|L|H)/(\d+)$", re.IGNORECASE)


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    height, width = value
    return (int(height), int(width))


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a Vision Transformer (Dosovitskiy et al. 2021)."""

    image_size: tuple[int, int] = (224, 224)  # (height, width) the model was trained at
    patch_size: int = 16  # P
    in_channels: int = 3  # C
    num_classes: int = 1000  # K; 0 means no head (features only)
    width: int = 768  # D
    depth: int = 12  # L
    num_heads: int = 12  # nh
    mlp_dim: int = 3072
    pos_embed: str = "learned"  # "learned" or "sincos2d" (fixed)
    class_token: bool = True
    pool: str = "cls"  # "cls" reads the CLS token, "mean" averages the patch tokens
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    act: str = "gelu"  # exact erf GELU as timm/HF; "gelu_tanh" as the original JAX code
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block (DeiT); not in the paper
    name: str = field(default="", compare=False)  # a display name such as "B/16"
    # -- the families after the paper (timm's flag names where timm has one) --
    reg_tokens: int = 0  # registers after CLS (Darcet et al. 2024); no position of their own
    dist_token: bool = False  # DeiT's distillation token, second after CLS
    no_embed_class: bool = False  # position table covers the patches only (DeiT III, DINOv2-reg)
    pre_norm: bool = False  # LayerNorm before the first block (CLIP's ln_pre)
    layer_scale: float | None = None  # init of per-channel gammas on both branches (CaiT)
    patch_bias: bool = True  # CLIP's patch projection has none
    fc_norm: bool = False  # final LN after pooling instead of over all tokens (timm avg pool)
    head_kind: str = "classifier"  # "projection": the head maps into an embedding space (CLIP)
    pos_resample: str = "bicubic-antialias"  # resampling rule of the home library
    family: str = field(default="vit", compare=False)  # display only: vit, deit, dinov2, ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size))
        problems = []
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        height, width = self.image_size
        if height % self.patch_size or width % self.patch_size:
            problems.append(
                f"image size {height}x{width} is not a multiple of patch size {self.patch_size}"
            )
        if self.pos_embed not in POS_EMBEDS:
            problems.append(f"pos_embed must be one of {POS_EMBEDS}, not {self.pos_embed!r}")
        if self.pool not in POOLS:
            problems.append(f"pool must be one of {POOLS}, not {self.pool!r}")
        if self.pool in ("cls", "cls+mean", "dist") and not self.class_token:
            problems.append(f"pool {self.pool!r} needs class_token=True")
        if self.pool == "dist" and not self.dist_token:
            problems.append("pool 'dist' needs dist_token=True")
        if self.dist_token and (self.reg_tokens or not self.class_token):
            problems.append("dist_token needs class_token=True and no reg_tokens")
        if self.reg_tokens < 0:
            problems.append(f"reg_tokens must be 0 or more, not {self.reg_tokens}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            problems.append(f"layer_scale must be positive or None, not {self.layer_scale}")
        if self.head_kind not in HEAD_KINDS:
            problems.append(f"head_kind must be one of {HEAD_KINDS}, not {self.head_kind!r}")
        if self.pos_resample not in POS_RESAMPLES:
            problems.append(
                f"pos_resample must be one of {POS_RESAMPLES}, not {self.pos_resample!r}"
            )
        if self.act not in ACTS:
            problems.append(f"act must be one of {ACTS}, not {self.act!r}")
        if min(self.patch_size, self.width, self.depth, self.num_heads, self.mlp_dim) < 1:
            problems.append("patch_size, width, depth, num_heads and mlp_dim must be positive")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        """(Hp, Wp): rows and columns of the patch grid at the trained image size."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS, dist or registers]."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def pos_prefix_tokens(self) -> int:
        """Prefix rows in the position table: none when it covers the patches only."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def pooled_dim(self) -> int:
        """Width of the features the head reads: 2D for cls+mean, else D."""
        return 2 * self.width if self.pool == "cls+mean" else self.width

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> ViTConfig:
        """A config from the paper's table: "B/16", "Ti/16", "L/14", ...; fields overridable."""
        match = _VARIANT_RE.match(variant.strip())
        if not match:
            raise ValueError(
                f"unknown variant {variant!r}: use one of "
                + ", ".join(f"{v}/{p}" for v in VARIANTS for p in (16,))
                + " (patch sizes 8, 14, 16, 32)"
            )
        size = {k.lower(): k for k in VARIANTS}[match.group(1).lower()]
        patch = int(match.group(2))
        if patch not in PATCH_SIZES:
            raise ValueError(f"unknown patch size {patch} in {variant!r}: use one of {PATCH_SIZES}")
        depth, width, mlp_dim, num_heads = VARIANTS[size]
        fields: dict = dict(
            patch_size=patch,
            depth=depth,
            width=width,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            name=f"{size}/{patch}",
        )
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def sanity_problems(self) -> list[str]:
        """What makes a config absurd rather than invalid (e.g. a typo in a hand-written file)."""
        problems = []
        if self.depth > 256 or self.width > 16_384 or self.num_heads > 256:
            problems.append(
                f"depth {self.depth}, width {self.width}, {self.num_heads} heads is beyond any "
                "published ViT"
            )
        if self.mlp_dim > 16 * self.width:
            problems.append(f"mlp_dim {self.mlp_dim} is over 16x the width {self.width}")
        if self.patch_size > min(self.image_size):
            problems.append(f"patch size {self.patch_size} exceeds the image {self.image_size}")
        if self.reg_tokens > 64:
            problems.append(f"{self.reg_tokens} registers (published models use 4 to 16)")
        return problems

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))


def is_variant(text: str) -> bool:
    return bool(_VARIANT_RE.match(text.strip()))


_POOL_TEXT = {
    "cls": "CLS token",
    "mean": "mean of the patch tokens",
    "cls+mean": "CLS and the patch-token mean, concatenated",
    "map": "attention-pooling probe (MAP)",
    "dist": "mean of the CLS head and the distillation head",
}


def describe_family(config: ViTConfig) -> dict:
    """What `vit info` shows about a model's family, as plain values (JSON-ready)."""
    prefix = []
    if config.class_token:
        prefix.append("CLS")
    if config.dist_token:
        prefix.append("dist")
    if config.reg_tokens:
        prefix.append(f"{config.reg_tokens} registers")
    if config.num_classes == 0:
        head = "none (features only)"
    elif config.head_kind == "projection":
        head = f"projection to {config.num_classes} dimensions (no classifier)"
    else:
        head = f"classifier, {config.num_classes} classes" + (
            " (two heads, averaged)" if config.pool == "dist" else ""
        )
    extras = [
        name
        for name, present in (
            ("LN before the blocks", config.pre_norm),
            ("LN after pooling", config.fc_norm),
            ("no patch bias", not config.patch_bias),
            ("no position for prefix tokens", config.no_embed_class and config.num_prefix_tokens),
        )
        if present
    ]
    return {
        "family": config.family,
        "prefix_tokens": config.num_prefix_tokens,
        "prefix": " + ".join(prefix) or "none",
        "pooling": _POOL_TEXT[config.pool],
        "embedding_dim": (
            config.num_classes if config.head_kind == "projection" else config.pooled_dim
        ),
        "head": head,
        "layer_scale": config.layer_scale,
        "mlp": {"gelu": "GELU", "gelu_tanh": "GELU (tanh)", "quick_gelu": "QuickGELU"}.get(
            config.act, "SwiGLU (packed)"
        ),
        "position_resampling": config.pos_resample,
        "extras": extras,
    }
