"""Images decoded one by one in worker processes, handed back in input order.

The unit of work is one image, not one batch: while the first batch is being filled every
worker decodes part of it (a batch per worker would leave all but one core idle until the first
forward pass can start), and the consumer can see, without waiting, how far decoding has run
ahead of it (`ready_ahead`), which is what `loader.image_batches` uses to share the cores
between the decoders and the model (runtime.model_threads).

At most `lookahead` images are in flight (submitted and not yet taken), which bounds memory;
each comes back as a numpy array pickled through the pool's pipe (see loader.py for why not a
tensor). Workers are forked where the platform allows (nothing to import again), run
`die_with_parent` first and torch on one thread (see `_start_worker`). A worker that dies (a
crash in a decoder library) fails the run with one error rather than hanging it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..runtime import die_with_parent

# The dataset each worker decodes from: set once per worker by `_start_worker`.
_WORKER_ITEMS: Callable[[int], Any] | None = None


def _start_worker(items: Callable[[int], Any], parent: int) -> None:
    global _WORKER_ITEMS
    die_with_parent(parent)
    if "torch" in sys.modules:
        # A forked child that enters a parallel region of the parent's OpenMP team waits
        # forever at its barrier (GNU OpenMP is not fork-safe); one thread never starts a
        # team. The torchvision-style resize runs torch ops here. (DataLoader does the same.)
        import torch

        torch.set_num_threads(1)
    _WORKER_ITEMS = items


def _decode(index: int) -> Any:
    assert _WORKER_ITEMS is not None
    return _WORKER_ITEMS(index)


class OrderedDecoding:
    """`take()` returns item 0, 1, 2, ... of `items(index)` for index in range(count), each
    computed in one of `workers` processes (or inline with 0 workers), at most `lookahead` of
    them in flight. Use as a context manager: leaving it stops the workers."""

    def __init__(
        self, items: Callable[[int], Any], count: int, workers: int, lookahead: int
    ) -> None:
        self.items = items
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
                initargs=(items, os.getpid()),
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
        self._submit()
        try:
            return [
                stolen[i] if i in stolen else future.result() for i, future in enumerate(futures)
            ]
        except BrokenProcessPool:
            raise RuntimeError(
                "a decoding worker died (killed, or a crash in an image library); "
                "rerun with --workers 0 to decode in the main process and see the error"
            ) from None

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
