"""The network itself; imports torch and the standard library only."""

from .config import VARIANTS, ViTConfig, describe_family, is_variant
from .vit import ViT

__all__ = ["VARIANTS", "ViT", "ViTConfig", "describe_family", "is_variant"]
