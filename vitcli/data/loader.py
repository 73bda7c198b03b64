"""Batches of preprocessed images decoded in worker processes, failures kept per item.

Images are decoded one by one (data/decoders.py: in order, a bounded window ahead, the main
process lending a hand while it waits) and put together into batches here. A failed decode
never stops the batch: the worker returns the error text for that index and `collate` splits
successes (stacked into one array) from failures.

Workers resize but do not normalise: a batch travels as uint8, a quarter of the bytes of
float32, and `normalize`, the one normalisation in vitcli, turns it into the model's input on
the target device (on a GPU the host-to-device copy shrinks by the same factor; on a CPU the
workers, which compete with the forward pass for cores, do less). `image_batches` applies it
itself: every Batch arrives with `inputs`, ready for the model, so no consumer can forget it.

An image crosses the worker boundary as a numpy array (in a shared-memory slot where workers
are forked, decoders.PixelSlots; else pickled through the worker's pipe), not as a torch
tensor. A tensor travels through torch's shared-memory hand-off, whose receiving
side keeps a weak reference per batch in `torch.multiprocessing.reductions.shared_cache` and
sweeps the dead ones only when 128 have piled up. Those dead entries keep small allocations
alive in the heap that each batch's float input had just been freed to, and glibc could then
neither reuse nor return that space: the main process grew from 385 MB after 500 images to
1078 MB after 5000 (224x224, one worker; bench/memory.py). Measured, not guessed:
malloc_trim(0) gave all of it back, and sweeping shared_cache after every batch kept it flat.
As arrays there is nothing to sweep, and memory stays flat (357 MB, then 309 MB).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..runtime import model_threads
from .decoders import EarlyDecoding, ImageFiles, decode_images
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


def collate(items) -> Batch:
    """ImageFiles items -> one Batch; `pixels` is a numpy array until `image_batches` makes it
    a tensor."""
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
    share_cores: bool = False,
    early: EarlyDecoding | None = None,
) -> Iterator[Batch]:
    """An ordered iterator of Batch, each with `inputs` normalised on `device` (default the
    CPU) in `dtype`; decoding overlaps the forward pass when workers > 0.

    Batch k always covers positions [k * batch_size, (k + 1) * batch_size) of `paths`;
    `errors[i]`, when given and not None, is reported as the failure of position i unread.
    `display_long_side` also returns each original scaled to that long side (Batch.displays).
    `pin_memory` stages each uint8 batch in page-locked memory before a CUDA copy.

    `share_cores` (for a model on the CPU; off by default): before each batch is handed over,
    torch's thread count is set for the forward pass that follows, from whether images are
    still being decoded beside it (runtime.model_threads), and restored at the end. On the
    shared 2-core development machine it was not measurably faster than leaving the model all
    threads (bench/README.md, "Third round"), so no command turns it on yet.

    `early`: images already decoding since before the model was loaded (decoders.py), used
    when they are these images decoded this way, stopped otherwise.
    """
    dataset = ImageFiles(
        paths, preprocess, draft=draft, errors=errors, display_long_side=display_long_side
    )
    decoding = early.take_over(dataset, batch_size) if early is not None else None
    if decoding is None:
        decoding = decode_images(dataset, workers, batch_size)
    share_cores = share_cores and decoding.workers > 0
    all_threads = torch.get_num_threads()
    with decoding as decoded:
        try:
            for _ in range(0, len(dataset), batch_size):
                batch = collate(decoded.take(batch_size))
                if share_cores:
                    left = decoded.remaining()
                    torch.set_num_threads(model_threads(all_threads, decoded.workers, left))
                yield _to_model(batch, preprocess, pin_memory, device, dtype)
        finally:
            if share_cores:
                torch.set_num_threads(all_threads)


def _to_model(
    batch: Batch,
    preprocess: Preprocess,
    pin_memory: bool,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Batch:
    if not batch.indices:
        batch.pixels = torch.empty((0,), dtype=torch.uint8)
        batch.inputs = torch.empty((0,), dtype=dtype)
        return batch
    pixels = (
        torch.from_numpy(batch.pixels) if isinstance(batch.pixels, np.ndarray) else batch.pixels
    )
    batch.pixels = pixels
    staged = pixels.pin_memory() if pin_memory else pixels
    batch.inputs = normalize(staged, preprocess, device, dtype)
    return batch
