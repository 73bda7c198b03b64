"""Batches of preprocessed images decoded in DataLoader workers, failures kept per item.

A failed decode never stops the batch: the worker returns the error text for that index and
the collate function splits successes (stacked into one tensor) from failures.

Workers resize but do not normalise: a batch travels as uint8, a quarter of the bytes of
float32, and `normalize` turns it into the model's input on the target device (on a GPU the
host-to-device copy shrinks by the same factor; on a CPU the workers, which compete with the
forward pass for cores, do less).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageDecodeError
from .images import display_size, open_image
from .preprocess import Geometry, Preprocess


@dataclass
class Batch:
    indices: list[int]  # positions in the input list of the images in `pixels`, in order
    pixels: torch.Tensor  # (B, C, H, W) uint8, resized, not yet normalised: see `normalize`
    geometries: list[Geometry]
    failures: list[tuple[int, str]]  # (position, error message)
    # With `display_long_side`: per image in `indices`, the original (EXIF-rotated) scaled to
    # that long side, or as decoded when smaller: (h, w, 3) uint8 for drawing overlays on.
    displays: list[np.ndarray] | None = None

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True), which cannot see inside a dataclass."""
        if self.pixels.numel():
            self.pixels = self.pixels.pin_memory()
        return self


def normalize(
    pixels: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, C, H, W) uint8 -> the model input on `device` in `dtype`.

    The same float32 operations, in the same order, as `Preprocess.to_array` (x / 255, then
    (x - mean) / std), so the result is bitwise identical to normalising image by image.
    """
    x = pixels.to(device, non_blocking=True) if device is not None else pixels
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    x = x.to(torch.float32).mul_(1.0 / 255.0).sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)


class ImageFiles(Dataset):
    """Paths -> (index, CHW uint8 array, geometry, display or None, None) or
    (index, None, None, None, error message)."""

    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Preprocess,
        draft: bool = True,
        errors: Sequence[str | None] | None = None,
        display_long_side: int | None = None,
    ) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.draft = draft
        self.display_long_side = display_long_side
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
            return index, None, None, None, self.errors[index]
        try:
            draft_for = self.preprocess.resized_size if self.draft else None
            image, original_size = open_image(path, draft_for=draft_for)
            array = self.preprocess.to_uint8(self.preprocess.resize_image(image, original_size))
            return (
                index,
                array,
                self.preprocess.geometry(*original_size),
                self._display(image, original_size),
                None,
            )
        except ImageDecodeError as error:
            return index, None, None, None, str(error)
        except Exception as error:
            return (
                index,
                None,
                None,
                None,
                f"{path}: cannot process image ({type(error).__name__}: {error})",
            )

    def _display(self, image: Image.Image, original_size: tuple[int, int]) -> np.ndarray | None:
        """The image to draw overlays on, made from the pixels already decoded (a second
        decode of a large JPEG costs more than this resize): scaled down to the long side
        asked for, or as decoded when it is no larger."""
        if self.display_long_side is None:
            return None
        size = display_size(original_size, self.display_long_side)
        if image.width > size[0] and image.height > size[1]:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image)


def collate(items) -> Batch:
    good = [item for item in items if item[4] is None]
    if good:
        pixels = torch.from_numpy(np.stack([item[1] for item in good]))
    else:
        pixels = torch.empty(0)
    displays = [item[3] for item in good]
    return Batch(
        indices=[item[0] for item in good],
        pixels=pixels,
        geometries=[item[2] for item in good],
        failures=[(item[0], item[4]) for item in items if item[4] is not None],
        displays=displays
        if displays and all(display is not None for display in displays)
        else None,
    )


def image_batches(
    paths: Sequence[str],
    preprocess: Preprocess,
    batch_size: int = 32,
    workers: int = 2,
    draft: bool = True,
    pin_memory: bool = False,
    errors: Sequence[str | None] | None = None,
    display_long_side: int | None = None,
) -> DataLoader:
    """An ordered iterator of Batch; decoding overlaps the forward pass when workers > 0.

    Batch k always covers positions [k * batch_size, (k + 1) * batch_size) of `paths`;
    `errors[i]`, when given and not None, is reported as the failure of position i unread.
    `display_long_side` also returns each original scaled to that long side (Batch.displays).
    """
    dataset = ImageFiles(
        paths, preprocess, draft=draft, errors=errors, display_long_side=display_long_side
    )
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
