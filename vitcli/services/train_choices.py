"""The choices of `vit train`'s enum options, in a module that imports nothing heavy: the CLI
builds `vit train --help` from them without importing the training package (whose
`__init__` imports torch). services/train/config.py uses the same classes."""

from __future__ import annotations

from enum import Enum


class PosEmbed(str, Enum):
    learned = "learned"
    sincos2d = "sincos2d"


class Pool(str, Enum):
    cls = "cls"
    mean = "mean"


class Amp(str, Enum):
    auto = "auto"
    off = "off"


__all__ = ["Amp", "Pool", "PosEmbed"]
