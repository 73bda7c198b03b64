"""Batches of preprocessed images decoded in DataLoader workers, failures kept per item.

A failed decode never stops the batch: the worker returns the error text for that index and
the collate function splits successes (stacked into one array) from failures.

Workers resize but do not normalise: a batch travels as uint8, a quarter of the bytes of
float32, and `normalize`, the one normalisation in vitcli, turns it into the model's input on
the target device (on a GPU the host-to-device copy shrinks by the same factor; on a CPU the
workers, which compete with the forward pass for cores, do less). `image_batches` applies it
itself: every Batch arrives with `inputs`, ready for the model, so no consumer can forget it.

A batch crosses the worker boundary as a numpy array (pickled through the worker's pipe), not
as a torch tensor. A tensor travels through torch's shared-memory hand-off, whose receiving
side keeps a weak reference per batch in `torch.multiprocessing.reductions.shared_cache` and
sweeps the dead ones only when 128 have piled up. Those dead entries keep small allocations
alive in the heap that each batch's float input had just been freed to, and glibc could then
neither reuse nor return that space: the main process grew from 385 MB after 500 images to
1078 MB after 5000 (224x224, one worker; bench/memory.py). Measured, not guessed:
malloc_trim(0) gave all of it back, and sweeping shared_cache after every batch kept it flat.
As arrays there is nothing to sweep, and memory stays flat (357 MB, then 309 MB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageDecodeError
from ..runtime import die_with_parent
from .images import display_size, open_image
from .preprocess import Geometry, Preprocess


@dataclass
class Batch:
    indices: list[int]  # positions in the input list of the images in `pixels`, in order
    pixels: torch.Tensor  # (B, C, H, W) uint8 on the CPU, resized, not normalised
    geometries: list[Geometry]
    failures: list[tuple[int, str]]  # (position, error message)
    # With `display_long_side`: per image in `indices`, the original (EXIF-rotated) scaled to
    # that long side, or as decoded when smaller: (h, w, 3) uint8 for drawing overlays on.
    displays: list[np.ndarray] | None = None
    # (B, C, H, W) the model input: `pixels` through `normalize`, on the device and in the
    # dtype given to `image_batches`. Empty when no image of the batch decoded.
    inputs: torch.Tensor | None = None


def normalize(
    pixels: torch.Tensor,
    preprocess: Preprocess,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, C, H, W) uint8 -> the model input on `device` in `dtype`: the one normalisation,
    for inference batches and training batches alike.

    x * rescale (1/255), then (x - mean) / std, in float32 whatever the target dtype,
    elementwise: the result is bitwise identical to normalising image by image (`prepare`).
    Anything but uint8 is refused: normalising twice would give plausible-looking garbage.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize takes uint8 pixels, got {pixels.dtype}: already normalised?")
    x = pixels.to(device, non_blocking=True) if device is not None else pixels
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    x = x.to(torch.float32).mul_(preprocess.rescale).sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)


def prepare(
    image: Image.Image, preprocess: Preprocess, original_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """One decoded RGB image -> (C, H, W) float32 model input: resize/crop, then `normalize`.
    The single-image form of what the batch pipeline does (parity tests, notebooks)."""
    pixels = torch.from_numpy(preprocess.pixels(image, original_size))
    return normalize(pixels[None], preprocess)[0]  # C,H,W


class ImageFiles(Dataset):
    """Paths -> (index, CHW uint8 array, geometry, display or None, None) or
    (index, None, None, None, error message)."""

    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Preprocess,
        draft: bool = False,
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
            image, original_size = open_image(
                path, draft_for=draft_for, exif=self.preprocess.exif, rgb=self.preprocess.rgb
            )
            array = self.preprocess.pixels(image, original_size)
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
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.width > size[0] and image.height > size[1]:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image)


def collate(items) -> Batch:
    """Runs in the worker. `pixels` stays a numpy array here (see the module docstring);
    `image_batches` makes it a tensor in the main process."""
    good = [item for item in items if item[4] is None]
    if good:
        pixels = np.stack([item[1] for item in good])
    else:
        pixels = np.empty((0,), np.uint8)
    displays = [item[3] for item in good]
    return Batch(
        indices=[item[0] for item in good],
        pixels=pixels,  # type: ignore[arg-type]  # a tensor once it reaches the main process
        geometries=[item[2] for item in good],
        failures=[(item[0], item[4]) for item in items if item[4] is not None],
        displays=displays
        if displays and all(display is not None for display in displays)
        else None,
    )


def _die_with_parent(worker_id: int, *, parent: int) -> None:
    """DataLoader worker_init_fn: the worker is killed the moment the main process dies.

    torch's own check is not enough: a worker polls the parent it sees at start-up every 5 s,
    so a worker whose parent died while it was starting watches init instead and waits
    forever; and a worker with a batch still queued for a dead parent may block at exit on a
    pipe that nobody reads. Linux's parent-death signal needs no cooperation (it follows the
    thread that started the workers, which is the one iterating).
    """
    die_with_parent(parent)


def image_batches(
    paths: Sequence[str],
    preprocess: Preprocess,
    batch_size: int = 32,
    workers: int = 2,
    draft: bool = False,
    pin_memory: bool = False,
    errors: Sequence[str | None] | None = None,
    display_long_side: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[Batch]:
    """An ordered iterator of Batch, each with `inputs` normalised on `device` (default the
    CPU) in `dtype`; decoding overlaps the forward pass when workers > 0.

    Batch k always covers positions [k * batch_size, (k + 1) * batch_size) of `paths`;
    `errors[i]`, when given and not None, is reported as the failure of position i unread.
    `display_long_side` also returns each original scaled to that long side (Batch.displays).
    `pin_memory` stages each uint8 batch in page-locked memory before a CUDA copy.
    """
    dataset = ImageFiles(
        paths, preprocess, draft=draft, errors=errors, display_long_side=display_long_side
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=partial(_die_with_parent, parent=os.getpid()) if workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    for batch in loader:
        pixels = (
            batch.pixels
            if isinstance(batch.pixels, torch.Tensor)
            else torch.from_numpy(batch.pixels)
        )
        if not batch.indices:
            batch.pixels = torch.empty((0,), dtype=torch.uint8)
            batch.inputs = torch.empty((0,), dtype=dtype)
            yield batch
            continue
        batch.pixels = pixels
        staged = pixels.pin_memory() if pin_memory else pixels
        batch.inputs = normalize(staged, preprocess, device, dtype)
        yield batch
