"""The training and evaluation dataset over a scanned image folder (data/folder.py): items,
batches that cross the worker boundary as numpy arrays, samplers and the DataLoader.

A training item is decoded and augmented with an RNG seeded from (seed, epoch, index), so a
sample looks the same whichever worker or rank decodes it and whether or not the run was
resumed. A file that fails to decode becomes a failure entry in its batch instead of an
exception in a worker; the trainer reports each such file once and trains on the rest.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..errors import ImageDecodeError
from ..runtime import die_with_parent
from .augment import TrainTransform
from .folder import LabelledImages
from .images import open_image
from .preprocess import Preprocess


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation RNG of one sample in one epoch (str seeds hash with sha512: stable)."""
    return random.Random(f"{seed}:{epoch}:{index}")


class FolderDataset(Dataset):
    """Keys (index, epoch) or plain indices -> (index, CHW uint8 array or None, label, error or
    None). Pixels stay uint8 (resized and augmented, not normalised): data.loader.normalize
    turns a batch into the model input on the device."""

    def __init__(
        self,
        data: LabelledImages,
        transform: TrainTransform | Preprocess,
        seed: int = 0,
        draft: bool | None = None,
    ) -> None:
        self.samples = list(data.samples)
        self.transform = transform
        self.seed = seed
        # JPEG draft decoding by default only under training augmentation (a random crop of
        # a draft decode is as good a sample); evaluation decodes in full, as the home does.
        self.draft = not isinstance(transform, Preprocess) if draft is None else draft
        recipe = transform if isinstance(transform, Preprocess) else transform.preprocess
        self.exif, self.rgb = recipe.exif, recipe.rgb

    def __len__(self) -> int:
        return len(self.samples)

    def _draft_size(self, width: int, height: int) -> tuple[int, int]:
        if isinstance(self.transform, Preprocess):
            return self.transform.resized_size(width, height)
        # A crop of the smallest allowed area is still upsampled at most 1x after draft decoding.
        out_h, out_w = self.transform.preprocess.size
        grow = 1.0 / math.sqrt(self.transform.scale[0])
        return math.ceil(out_w * grow), math.ceil(out_h * grow)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        try:
            image, original_size = open_image(
                path,
                draft_for=self._draft_size if self.draft else None,
                exif=self.exif,
                rgb=self.rgb,
            )
            if isinstance(self.transform, Preprocess):
                array = self.transform.pixels(image, original_size)
            else:
                array = self.transform(image, item_rng(self.seed, epoch, index))
            return index, array, label, None
        except ImageDecodeError as error:
            return index, None, label, str(error)
        except Exception as error:
            return (
                index,
                None,
                label,
                f"{path}: cannot process image ({type(error).__name__}: {error})",
            )


@dataclass
class LabelledBatch:
    """A batch as it crosses the worker boundary: numpy arrays, pickled through the worker's
    pipe. (A torch tensor would go through torch's shared-memory hand-off, whose receiving side
    keeps a weak reference per batch and pins freed heap space: the main process would grow
    with every batch; see data/loader.py.) The tensor is made on this side: `pixel_tensor`."""

    indices: list[int]
    pixels: np.ndarray  # (B, C, H, W) uint8, not normalised; B may be 0 (all failed)
    labels: np.ndarray  # (B,) int64
    failures: list[tuple[int, str]]  # (dataset index, message)
    pinned: torch.Tensor | None = None  # `pixels` in pinned memory, when the loader pins

    def __len__(self) -> int:
        return len(self.indices)

    def pixel_tensor(self) -> torch.Tensor:
        """(B, C, H, W) uint8 CPU tensor of the pixels, for data.loader.normalize."""
        return self.pinned if self.pinned is not None else torch.from_numpy(self.pixels)

    def label_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.labels)

    def pin_memory(self) -> LabelledBatch:
        """Called by DataLoader(pin_memory=True) in the main process."""
        if len(self):
            self.pinned = torch.from_numpy(self.pixels).pin_memory()
        return self


def collate_labelled(items) -> LabelledBatch:
    good = [item for item in items if item[3] is None]
    pixels = np.stack([item[1] for item in good]) if good else np.empty((0,), np.uint8)
    return LabelledBatch(
        indices=[item[0] for item in good],
        pixels=pixels,
        labels=np.asarray([item[2] for item in good], dtype=np.int64),
        failures=[(item[0], item[3]) for item in items if item[3] is not None],
    )


class EpochSampler(Sampler):
    """torch's DistributedSampler (permutation seeded by seed + epoch, padded shards per rank)
    that yields (index, epoch) keys, so each item's augmentation RNG knows its epoch even in
    workers started before `set_epoch` was called."""

    def __init__(
        self, length: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        self.inner: DistributedSampler = DistributedSampler(
            range(length),  # type: ignore[arg-type]  # any sized sequence works
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((index, epoch) for index in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class ShardSampler(Sampler):
    """Evaluation shard of one rank: indices rank, rank + world, ... (no padding, so metrics
    summed over ranks count every image exactly once)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _init_worker(parent: int, worker_id: int) -> None:
    die_with_parent(parent)
    # Items carry their own RNG; this only keeps any stray global RNG use reproducible.
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32 if info is not None else worker_id
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: FolderDataset,
    sampler: Sampler,
    batch_size: int,
    workers: int,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)  # fixes the worker base seeds
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_labelled,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_init_worker, os.getpid()) if workers > 0 else None,
        generator=generator,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
