"""vitcli: Vision Transformer classification, attention maps and training.

The public API is imported lazily so that `vit --help` never pays for importing torch.
"""

from ._version import __version__

__all__ = ["ViT", "ViTConfig", "__version__", "load_model", "save_model"]


def __getattr__(name: str):
    if name in ("ViT", "ViTConfig"):
        from . import model

        return getattr(model, name)
    if name == "load_model":
        from .weights.resolve import load_model

        return load_model
    if name == "save_model":
        from .weights.format import save_model

        return save_model
    raise AttributeError(f"module 'vitcli' has no attribute {name!r}")
