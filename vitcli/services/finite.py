"""One check and one message for a model whose numbers are not finite (NaN weights, an
overflow): every command that uses a model's outputs refuses them in one line rather than
printing `nan`, writing `NaN` into JSON or failing later in a colour map."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CheckpointError


def not_finite_message(what: str, model: str | None) -> str:
    return (
        f"{what} holds values that are not finite (NaN or infinity); {model or 'the model'} "
        "has broken weights or preprocessing values (std 0?)"
    )


def is_finite(values: torch.Tensor | np.ndarray | float) -> bool:
    if isinstance(values, torch.Tensor):
        return bool(torch.isfinite(values).all())
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


def require_finite(values: torch.Tensor | np.ndarray | float, what: str, model: str | None) -> None:
    """Raise CheckpointError (one line, exit 1) unless every value is finite."""
    if not is_finite(values):
        raise CheckpointError(not_finite_message(what, model))


def finite_rows(values: torch.Tensor) -> list[bool]:
    """Per row (dim 0): whether every value of that row is finite."""
    return torch.isfinite(values.reshape(len(values), -1)).all(dim=1).tolist()
