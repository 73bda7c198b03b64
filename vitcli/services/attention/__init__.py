"""`vit attention`: attention maps of a ViT, drawn on the original images and written to disk.

Modules, in the order a batch meets them:
- options:  AttentionOptions, the one frozen object describing a run (validated)
- runner:   run(options, on_progress) -> RunSummary: inputs, model, the loop, threads
- batches:  decoding workers -> compute_batch per batch -> ImageAttention per image
- methods:  the shared forward pass and the registry of named map methods (rollout, ...)
- maps:     the maths (CLS maps, head fusion, rollout, mass masks), pure batched torch
- paint:    sampling grid maps onto pixels, blending overlays; colormaps: the tables
- sheet:    the contact sheet's layout and text; png: the fast PNG encoder
- files:    output folder, maps.safetensors / .npy, meta.json, per-head PNGs, index.html
- names:    output folder names; file names made safe to show or store
- localization: rollout scored against object masks (the pointing game)
"""

from .batches import ImageAttention, attention_batches
from .methods import METHODS, Forward, Method, class_specific, register
from .options import AttentionOptions, parse_layers
from .runner import Progress, RunSummary, run

__all__ = [
    "METHODS",
    "AttentionOptions",
    "Forward",
    "ImageAttention",
    "Method",
    "Progress",
    "RunSummary",
    "attention_batches",
    "class_specific",
    "parse_layers",
    "register",
    "run",
]
