"""`vit attention`: attention maps of a ViT, drawn on the original images and written to disk.

Modules, in the order a batch meets them:
- options:  AttentionOptions, the one frozen object describing a run (validated)
- runner:   run(options, on_progress) -> RunSummary: inputs, model, the loop, threads
- batches:  decoding workers -> the explain core's maps per batch -> ImageAttention per image
            (the methods, their registry and the maths live in vitcli/explain)
- paint:    sampling grid maps onto pixels, blending overlays; colormaps: the tables
- sheet:    the contact sheet's band layout; heading: its header's words; png: the fast
            PNG encoder
- figure:   text that wraps instead of being cut, tile sizes by aspect, colour keys, the
            captions of --per-head PNGs
- files:    output folder, maps.safetensors / .npy, meta.json, per-head PNGs, explorer page
- meta:     meta.json's notes on query rows and prefix masses
- preview:  index.html's preview per image
- index:    index.html, the run's contact sheet
- names:    output folder names; file names made safe to show or store
- localization: a map scored against an object mask (the pointing game; `vit score`)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use (PEP 562): the CLI imports the option Enums from this package
# while building `vit --help`, which must not load torch (and torch must load only after
# runtime.prefer_passive_waiting has set the OpenMP policy).
_EXPORTS = {
    "AttentionOptions": "options",
    "parse_layers": "options",
    "ImageAttention": "batches",
    "attention_batches": "batches",
    "METHODS": "...explain.registry",
    "Forward": "...explain.forward",
    "Method": "...explain.forward",
    "class_specific": "...explain.registry",
    "register": "...explain.registry",
    "RunSummary": "runner",
    "run": "runner",
    "colormaps": "",
}

if TYPE_CHECKING:
    from ...explain.forward import Forward, Method
    from ...explain.registry import METHODS, class_specific, register
    from . import colormaps
    from .batches import ImageAttention, attention_batches
    from .options import AttentionOptions, parse_layers
    from .runner import RunSummary, run


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name] or name
    module = importlib.import_module(where if where.startswith(".") else f".{where}", __name__)
    value = module if not _EXPORTS[name] else getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    "METHODS",
    "AttentionOptions",
    "Forward",
    "ImageAttention",
    "Method",
    "RunSummary",
    "attention_batches",
    "class_specific",
    "colormaps",
    "parse_layers",
    "register",
    "run",
]
