"""Work a batch command starts before torch is imported: its inputs collected and their
images decoding.

`import torch` keeps one core busy for over a second, and loading the checkpoint takes a
little more; the other core had nothing to do until the model was ready. `vit predict` and
`vit embed` now collect their inputs first, forecast the checkpoint's preprocessing from its
small files (weights/peek.py), and fork their decoding workers before torch is imported
(which is also the safest moment to fork: no OpenMP team exists yet). When the model is
loaded, the loader takes the running decoding over if it decodes exactly the images it is
asked for, the way the loaded checkpoint says (data/decoders.py `EarlyDecoding`), and starts
again otherwise: the output never depends on the forecast.

Nothing is started under a torchrun launcher (the inputs are collected on rank 0 and shared),
for inputs read from stdin (read once, by the command), or when collecting the inputs fails
(the command then reports it as it always did).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import distributed
from ..data.decoders import EarlyDecoding, ImageFiles
from ..data.images import pixel_limit
from ..data.inputs import InputItem, collect_inputs
from ..errors import VitError
from ..runtime import check_batch_size, check_workers, prefer_passive_waiting
from ..weights.peek import peek_preprocess


@dataclass
class EarlyStart:
    """The inputs as collected, and their images decoding when the preprocessing could be
    forecast. Close it when the command ends (a no-op once the loader has taken it over)."""

    items: list[InputItem]
    decoding: EarlyDecoding | None

    def close(self) -> None:
        if self.decoding is not None:
            self.decoding.close()


def start_early(
    model: str | Path | None,
    inputs: Sequence[str],
    *,
    batch_size: int,
    workers: int,
    fast_decode: bool,
) -> EarlyStart | None:
    """Collect `inputs` and start decoding them for `model`; None when nothing was started."""
    if distributed.launched_distributed() or not inputs or "-" in inputs:
        return None
    try:
        check_batch_size(batch_size)
        check_workers(workers)
        pixel_limit()
        items = collect_inputs(list(inputs))
    except VitError:
        return None  # the command says why, as it always did
    preprocess = peek_preprocess(model)
    if preprocess is None or not items:
        return EarlyStart(items, None)
    dataset = ImageFiles(
        [item.path for item in items],
        preprocess,
        draft=fast_decode,
        errors=[item.error for item in items],
    )
    return EarlyStart(items, EarlyDecoding(dataset, workers, batch_size))


@contextmanager
def early_start(
    model: str | Path | None,
    inputs: Sequence[str],
    *,
    batch_size: int,
    workers: int,
    fast_decode: bool,
) -> Iterator[EarlyStart | None]:
    """`start_early` for the length of a command: whatever was started and not taken over
    is stopped when it ends, an error or an interrupt included. Call it before torch is
    imported; it sets what must be set before then (runtime.prefer_passive_waiting)."""
    prefer_passive_waiting()  # the workers it forks share the CPU with the model
    started = start_early(
        model, inputs, batch_size=batch_size, workers=workers, fast_decode=fast_decode
    )
    try:
        yield started
    finally:
        if started is not None:
            started.close()
