"""Images decoded one by one in worker processes, handed back in input order.

`ImageFiles` is what one image becomes (decoded, resized, its geometry; or its error),
`OrderedDecoding` computes such items in worker processes and hands them back in order, and
`EarlyDecoding` is one started before the model is loaded, for the loader to take over.

The unit of work is one image, not one batch: while the first batch is being filled every
worker decodes part of it (a batch per worker would leave all but one core idle until the first
forward pass can start), and the consumer can see, without waiting, how far decoding has run
ahead of it (`remaining`), which is what `loader.image_batches` uses to share the cores
between the decoders and the model (runtime.model_threads).

At most `lookahead` images are in flight (submitted and not yet taken), which bounds memory;
each comes back as a numpy array pickled through the pool's pipe (see loader.py for why not a
tensor). Workers are forked where the platform allows (nothing to import again), run
`die_with_parent` first and torch on one thread (see `_start_worker`). A worker that dies (a
crash in a decoder library) fails the run with one error rather than hanging it. Nothing here
imports torch: `EarlyDecoding` runs before it is imported.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError
from ..runtime import die_with_parent
from .images import display_size, open_image
from .preprocess import Preprocess

# Images in flight (decoding or decoded, not yet taken), in batches: the next batch decodes
# while the model runs this one, and a second gives the decoders room to run ahead.
LOOKAHEAD_BATCHES = 2
# Fewer images than this are decoded in the main process: starting workers costs more.
MIN_IMAGES_FOR_WORKERS = 4

# The dataset each worker decodes from, and how it packs a result (`PixelSlots.pack`): set
# once per worker by `_start_worker`.
_WORKER_ITEMS: Callable[[int], Any] | None = None
_WORKER_PACK: Callable[[int, Any], Any] | None = None


def _start_worker(
    items: Callable[[int], Any], pack: Callable[[int, Any], Any] | None, parent: int
) -> None:
    global _WORKER_ITEMS, _WORKER_PACK
    die_with_parent(parent)
    if "torch" not in sys.modules:
        # Forked before the parent imported torch (EarlyDecoding): should a resize import it
        # here, it starts on one thread (read when torch initialises its pools).
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    else:
        # A forked child that enters a parallel region of the parent's OpenMP team waits
        # forever at its barrier (GNU OpenMP is not fork-safe); one thread never starts a
        # team. The torchvision-style resize runs torch ops here. (DataLoader does the same.)
        import torch

        torch.set_num_threads(1)
    _WORKER_ITEMS, _WORKER_PACK = items, pack


def _decode(index: int) -> Any:
    assert _WORKER_ITEMS is not None
    item = _WORKER_ITEMS(index)
    return _WORKER_PACK(index, item) if _WORKER_PACK is not None else item


class OrderedDecoding:
    """`take()` returns item 0, 1, 2, ... of `items(index)` for index in range(count), each
    computed in one of `workers` processes (or inline with 0 workers), at most `lookahead` of
    them in flight. Use as a context manager: leaving it stops the workers.

    `pack(index, item)`, run in the worker, and `unpack(item)`, run here before the item is
    returned, let a result travel another way than pickled through the pool's pipe
    (`PixelSlots`); an item may only rely on what `pack` put aside until the next `take`."""

    def __init__(
        self,
        items: Callable[[int], Any],
        count: int,
        workers: int,
        lookahead: int,
        pack: Callable[[int, Any], Any] | None = None,
        unpack: Callable[[Any], Any] | None = None,
    ) -> None:
        self.items = items
        self.unpack = unpack
        self.count = count
        self.workers = max(0, min(workers, count))
        self.lookahead = max(1, lookahead)
        self.taken = 0
        self.submitted = 0
        self.pending: deque[Future] = deque()
        self.pool: ProcessPoolExecutor | None = None
        if self.workers:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
            self.pool = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_start_worker,
                initargs=(items, pack, os.getpid()),
            )
            self._submit()

    def _submit(self) -> None:
        assert self.pool is not None
        while self.submitted < self.count and len(self.pending) < self.lookahead:
            self.pending.append(self.pool.submit(_decode, self.submitted))
            self.submitted += 1

    def take(self, count: int = 1) -> list[Any]:
        """The next `count` items in order. While the first of them is not decoded yet the
        calling process does not just wait: it decodes, itself, the last of them that no
        worker has started (so with one worker two cores fill the first batch, and a batch
        the workers are behind on is finished sooner)."""
        count = min(count, self.count - self.taken)
        start = self.taken
        self.taken += count
        if self.pool is None:
            return [self.items(index) for index in range(start, start + count)]
        futures = [self.pending.popleft() for _ in range(count)]
        stolen: dict[int, Any] = {}
        last = count - 1
        while True:
            waiting = [f for i, f in enumerate(futures) if i not in stolen and not f.done()]
            if not waiting:
                break
            while last >= 0 and (last in stolen or not futures[last].cancel()):
                if last not in stolen and futures[last].running():
                    last = -1  # FIFO: every earlier one has started too
                    break
                last -= 1
            if last < 0:
                wait(waiting)
                continue
            stolen[last] = self.items(start + last)
            last -= 1
        try:
            items = [
                stolen[i] if i in stolen else self._received(future.result())
                for i, future in enumerate(futures)
            ]
        except BrokenProcessPool:
            raise RuntimeError(
                "a decoding worker died (killed, or a crash in an image library); "
                "rerun with --workers 0 to decode in the main process and see the error"
            ) from None
        self._submit()  # only now: a new item may reuse what a taken one was packed in
        return items

    def _received(self, item: Any) -> Any:
        return self.unpack(item) if self.unpack is not None else item

    def remaining(self) -> int:
        """Items not yet decoded: in flight or not yet submitted."""
        not_done = sum(1 for future in self.pending if not future.done())
        return not_done + (self.count - self.submitted)

    def close(self, kill: bool = False) -> None:
        """Stop the workers: after their current image, or at once with `kill` (on an error
        or an interrupt nobody waits for an image that may never come)."""
        if self.pool is None:
            return
        if kill:
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.kill()
        # Waited for even after a kill (the dead workers are reaped at once): left running, the
        # executor's manager thread races Python 3.11's exit handler on its wake-up pipe, which
        # then prints a "Bad file descriptor" traceback after our one-line error.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None

    def __enter__(self) -> OrderedDecoding:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.close(kill=exc_type is not None)

    def __iter__(self) -> Iterator[Any]:
        while self.taken < self.count:
            yield from self.take()


class ImageFiles:
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

    def key(self) -> tuple:
        """What decides every item: equal keys, equal items."""
        errors = tuple(self.errors) if self.errors is not None else None
        return (tuple(self.paths), self.preprocess, self.draft, errors, self.display_long_side)

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


def decoding_workers(requested: int, images: int) -> int:
    """Worker processes worth starting for `images` images: none for a handful (a fork costs
    more than decoding them here), never more than there are images."""
    return max(0, min(requested, images if images >= MIN_IMAGES_FOR_WORKERS else 0))


def decode_images(dataset: ImageFiles, workers: int, batch_size: int) -> OrderedDecoding:
    """`dataset`'s items in order, decoded by up to `workers` processes (decoding_workers),
    `LOOKAHEAD_BATCHES` batches of them in flight, their pixels handed over in shared memory
    where workers are forked (PixelSlots)."""
    count = decoding_workers(workers, len(dataset))
    lookahead = LOOKAHEAD_BATCHES * batch_size
    if not count or sys.platform != "linux":
        return OrderedDecoding(dataset.__getitem__, len(dataset), count, lookahead)
    slots = PixelSlots(min(lookahead, len(dataset)), (3, *dataset.preprocess.size))
    return OrderedDecoding(
        dataset.__getitem__, len(dataset), count, lookahead, slots.pack, slots.unpack
    )


# What `PixelSlots.pack` leaves in an item where its pixels were: they are in the item's slot.
IN_SLOT = "in shared slot"


class PixelSlots:
    """Decoded pixels handed from forked workers to the consumer through shared memory, not
    pickled through the pool's pipe.

    A (3, H, W) uint8 model-size image is 150 kB at 224 px, over twice a pipe's buffer: a
    worker writing it blocked until the consumer's executor thread had read it all, and that
    thread needs the GIL, which the consumer holds while it imports torch or runs Python
    between forward passes. Measured on 2 cores while torch was imported beside it, a worker
    managed one 1600x1200 JPEG per ~35 ms instead of ~20. Here each item in flight has its
    own slot (index modulo `count`, the decoding's lookahead, so no slot is written again
    before its item is taken), in an anonymous shared mapping made before the workers are
    forked; only the small rest of the item goes through the pipe, and `unpack` copies the
    pixels out. An array of another shape or type travels the usual way.
    """

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.count = max(1, count)
        self.shape = shape
        self.size = math.prod(shape)
        self.memory = mmap.mmap(-1, self.count * self.size)  # MAP_SHARED | MAP_ANONYMOUS

    def _slot(self, index: int) -> np.ndarray:
        offset = (index % self.count) * self.size
        view = np.frombuffer(self.memory, np.uint8, count=self.size, offset=offset)
        return view.reshape(self.shape)

    def pack(self, index: int, item: tuple) -> tuple:
        """In a worker: the item's pixels into its slot, `IN_SLOT` in their place."""
        pixels = item[1]
        shape = getattr(pixels, "shape", None)
        if isinstance(pixels, np.ndarray) and shape == self.shape and pixels.dtype == np.uint8:
            self._slot(index)[...] = pixels
            return (item[0], IN_SLOT, *item[2:])
        return item

    def unpack(self, item: tuple) -> tuple:
        """In the consumer: the item with its pixels copied out of their slot."""
        if isinstance(item[1], str) and item[1] == IN_SLOT:
            return (item[0], self._slot(item[0]).copy(), *item[2:])
        return item


class EarlyDecoding:
    """Images already decoding before the model is loaded, for `loader.image_batches` to take
    over when the dataset it is asked for is the one started (same paths, preprocessing,
    draft decoding, errors and displays: `ImageFiles.key`).

    Started before torch is imported (services/early.py), the workers are forked from a
    process with no OpenMP team, and decode while the parent imports torch and loads the
    checkpoint on the other core. When the checkpoint's preprocessing turns out not to be
    the one forecast (weights/peek.py), `take_over` stops the workers and the images are
    decoded again the usual way: the result never depends on the forecast.
    """

    def __init__(self, dataset: ImageFiles, workers: int, batch_size: int) -> None:
        self.key = dataset.key()
        self.decoding: OrderedDecoding | None = decode_images(dataset, workers, batch_size)
        self.adopted = False  # whether `take_over` handed the decoding on

    def take_over(self, dataset: ImageFiles, batch_size: int) -> OrderedDecoding | None:
        """The running decoding when it decodes `dataset` and keeps a batch of `batch_size` in
        flight, else None (and it is stopped). Either way, it is handed over at most once."""
        decoding, self.decoding = self.decoding, None
        if decoding is None:
            return None
        if decoding.taken or decoding.lookahead < batch_size or dataset.key() != self.key:
            decoding.close(kill=True)
            return None
        self.adopted = True
        return decoding

    def close(self) -> None:
        """Stop the workers unless `take_over` has handed them on (then their user does)."""
        if self.decoding is not None:
            self.decoding.close(kill=True)
            self.decoding = None
