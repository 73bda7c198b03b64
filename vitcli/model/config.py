"""The model configuration: one frozen dataclass plus the paper's variant table.

Every field maps one to one onto a CLI option and onto the JSON stored in the metadata of
our weight files, so a file fully describes the network that reads it.
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
POOLS = ("cls", "mean")
ACTS = ("gelu", "gelu_tanh")

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
        if self.pool == "cls" and not self.class_token:
            problems.append("pool 'cls' needs class_token=True")
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
        return 1 if self.class_token else 0

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> ViTConfig:
        """A config from the paper's table: "B/16", "Ti/16", "L/14", ...; fields may be overridden."""
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
        fields = dict(
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
