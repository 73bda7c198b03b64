"""Which class to explain: `top1|top2|...|LABEL|INDEX` turned into one index per image.

A spec is parsed once against the model's labels (so a typo fails before any image is read)
and resolved per batch against that batch's logits: `top2` is each image's own second class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import OptionError

_TOP_RE = re.compile(r"^top(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """A parsed `--target`: a rank among each image's logits (top-k) or a fixed class index."""

    spec: str
    rank: int | None = None  # 1 = the top class of each image
    index: int | None = None  # a fixed class for every image

    def indices(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) logits -> (B,) LongTensor of the class each image is explained for."""
        if self.index is not None:
            return torch.full((logits.shape[0],), self.index, dtype=torch.long)
        assert self.rank is not None
        if self.rank > logits.shape[1]:
            raise OptionError(
                f"--target {self.spec}: the model has only {logits.shape[1]} classes; "
                f"use top1..top{logits.shape[1]}"
            )
        return logits.detach().topk(self.rank, dim=1).indices[:, -1].cpu()


def parse_target(spec: str, labels: Sequence[str]) -> Target:
    """`top1`, `top2`, ..., a label of the model, or a class index -> a Target.

    A label wins over an index when a model's label is itself a number (its own name is
    what a user reads on the sheet). Raises InputError with the accepted forms otherwise.
    """
    text = str(spec).strip()
    match = _TOP_RE.match(text)
    if match:
        rank = int(match.group(1))
        if not 1 <= rank <= len(labels):
            raise OptionError(
                f"--target {text}: use top1..top{len(labels)} "
                f"(this model has {len(labels)} classes)"
            )
        return Target(spec=text, rank=rank)
    if text in labels:
        return Target(spec=text, index=list(labels).index(text))
    lowered = [label.lower() for label in labels]
    if text.lower() in lowered and lowered.count(text.lower()) == 1:
        return Target(spec=text, index=lowered.index(text.lower()))
    try:
        index = int(text)
    except ValueError:
        examples = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
        raise OptionError(
            f"--target {text!r}: not a label of this model; use top1, top2, ..., a label "
            f"({examples}) or a class index 0..{len(labels) - 1}"
        ) from None
    if not 0 <= index < len(labels):
        raise OptionError(
            f"--target {index} is out of range: this model has classes 0..{len(labels) - 1}"
        )
    return Target(spec=text, index=index)


def resolve_targets(
    spec: str | Target | torch.Tensor, logits: torch.Tensor, labels: Sequence[str]
) -> torch.Tensor:
    """Anything a caller may pass as a target -> (B,) LongTensor of class indices on the CPU."""
    if isinstance(spec, torch.Tensor):
        targets = spec.detach().to("cpu", torch.long).reshape(-1)
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for a batch of {logits.shape[0]}")
        if targets.numel() and not (
            int(targets.min()) >= 0 and int(targets.max()) < logits.shape[1]
        ):
            raise ValueError(f"target indices must be in [0, {logits.shape[1]})")
        return targets
    names = list(labels) or [f"class_{i}" for i in range(logits.shape[1])]
    target = spec if isinstance(spec, Target) else parse_target(spec, names)
    return target.indices(logits)
