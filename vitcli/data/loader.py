"""Batches of preprocessed images decoded in DataLoader workers, failures kept per item.

A failed decode never stops the batch: the worker returns the error text for that index and
the collate function splits successes (stacked into one tensor) from failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageDecodeError
from .images import open_image
from .preprocess import Geometry, Preprocess


@dataclass
class Batch:
    indices: list[int]  # positions in the input list of the images in `pixels`, in order
    pixels: torch.Tensor  # (B, C, H, W) float32
    geometries: list[Geometry]
    failures: list[tuple[int, str]]  # (position, error message)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True), which cannot see inside a dataclass."""
        if self.pixels.numel():
            self.pixels = self.pixels.pin_memory()
        return self


class ImageFiles(Dataset):
    """Paths -> (index, CHW float32 array or None, geometry or None, error or None)."""

    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Preprocess,
        draft: bool = True,
        errors: Sequence[str | None] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.draft = draft
        # Failures known before decoding (e.g. a named path that is not an image): the item
        # keeps its place in the batch, so batches stay aligned with positions in `paths`.
        self.errors = list(errors) if errors is not None else None
        if self.errors is not None and len(self.errors) != len(self.paths):
            raise ValueError(f"{len(self.errors)} errors for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        if self.errors is not None and self.errors[index] is not None:
            return index, None, None, self.errors[index]
        try:
            draft_for = self.preprocess.resized_size if self.draft else None
            image, original_size = open_image(path, draft_for=draft_for)
            array = self.preprocess(image, original_size=original_size)
            return index, array, self.preprocess.geometry(*original_size), None
        except ImageDecodeError as error:
            return index, None, None, str(error)
        except Exception as error:  # noqa: BLE001 - a batch job must outlive any one file
            return index, None, None, f"{path}: cannot process image ({type(error).__name__}: {error})"


def collate(items) -> Batch:
    good = [item for item in items if item[3] is None]
    if good:
        pixels = torch.from_numpy(np.stack([item[1] for item in good]))
    else:
        pixels = torch.empty(0)
    return Batch(
        indices=[item[0] for item in good],
        pixels=pixels,
        geometries=[item[2] for item in good],
        failures=[(item[0], item[3]) for item in items if item[3] is not None],
    )


def image_batches(
    paths: Sequence[str],
    preprocess: Preprocess,
    batch_size: int = 32,
    workers: int = 2,
    draft: bool = True,
    pin_memory: bool = False,
    errors: Sequence[str | None] | None = None,
) -> DataLoader:
    """An ordered iterator of Batch; decoding overlaps the forward pass when workers > 0.

    Batch k always covers positions [k * batch_size, (k + 1) * batch_size) of `paths`;
    `errors[i]`, when given and not None, is reported as the failure of position i unread.
    """
    dataset = ImageFiles(paths, preprocess, draft=draft, errors=errors)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
