"""Per-image decoding in worker processes (data/decoders.py) and how the loader shares the
CPU between the decoders and the model (runtime.model_threads)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vitcli.data.decoders import OrderedDecoding
from vitcli.data.loader import image_batches
from vitcli.data.preprocess import Preprocess
from vitcli.runtime import model_threads


def slow_item(index: int) -> tuple[int, int]:
    time.sleep(0.05)
    return index, os.getpid()


def test_items_come_back_in_order_and_the_waiting_process_decodes_some_itself():
    with OrderedDecoding(slow_item, 10, workers=1, lookahead=10) as decoded:
        first = decoded.take(8)
        rest = decoded.take(8)  # only 2 are left
    assert [index for index, _ in first + rest] == list(range(10))
    makers = {pid for _, pid in first}
    # One worker cannot start all 8 before the waiting main process takes the last ones.
    assert os.getpid() in makers and len(makers) == 2


def test_without_workers_everything_is_decoded_here():
    with OrderedDecoding(slow_item, 3, workers=0, lookahead=1) as decoded:
        assert [pid for _, pid in decoded] == [os.getpid()] * 3


def test_the_model_gets_the_cores_the_decoders_leave_then_all():
    assert model_threads(2, 1, decoding_left=40) == 1
    assert model_threads(2, 4, decoding_left=1) == 1
    assert model_threads(16, 4, decoding_left=40) == 12
    assert model_threads(2, 1, decoding_left=0) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_restore_the_thread_count_and_the_last_runs_on_all(tmp_path, workers):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(paths[-1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        batches = image_batches(
            paths, Preprocess(size=(16, 16)), batch_size=3, workers=workers, share_cores=True
        )
        for batch in batches:
            seen.append((batch.indices, torch.get_num_threads()))
        assert [indices for indices, _ in seen] == [[0, 1, 2], [3, 4, 5], [6]]
        assert seen[-1][1] == 2  # nothing left to decode: every thread for the model
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def torch_item(index: int) -> float:
    # Large enough for torch to split it over its OpenMP threads.
    return float(torch.arange(1_000_000, dtype=torch.float32).t().contiguous().sum()) + index


def test_workers_can_run_torch_after_the_parent_started_its_threads():
    """A forked worker entering the parent's OpenMP team would wait forever (the exact
    preprocessing resizes with torch in the workers)."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(2_000_000).mul_(2)  # the parent's thread team now exists
    results: list = []
    try:
        with OrderedDecoding(torch_item, 4, workers=2, lookahead=4) as decoded:
            thread = threading.Thread(target=lambda: results.extend(decoded.take(4)), daemon=True)
            thread.start()
            thread.join(timeout=120)
            assert not thread.is_alive(), "a decoding worker hangs in torch"
    finally:
        torch.set_num_threads(before)
    assert len(results) == 4
