"""`--linear-probe`: a frozen backbone and a new linear head on the features it pools (the
standard DINOv2/CLIP evaluation).

Without augmentation (no --randaugment, --mixup or --cutmix) every training image goes
through the backbone once, with the model's own eval preprocessing, and the epochs train the
head on those cached features: an epoch then costs a few matrix products. With augmentation
the backbone runs on every augmented batch, still frozen and in eval mode (no dropout).

What a head reads (`head_input`): ViT.pool's features (CLS after the final norm, the MAP
output, CLS+mean, ...), or for DeiT's two heads the CLS and dist tokens, (B, 2, D).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ...data.folder import LabelledImages
from ...data.labelled import EpochSampler, FolderDataset, ShardSampler, make_loader
from ...data.loader import normalize
from ...data.preprocess import Preprocess
from ...model import ViT


def uses_cached_features(linear_probe: bool, randaugment: int, mixup: float, cutmix: float) -> bool:
    return linear_probe and not randaugment and not mixup and not cutmix


def freeze_backbone(model: ViT) -> None:
    """Only the heads learn."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(("head.", "head_dist.")))


def head_input(model: ViT, pixels: torch.Tensor) -> torch.Tensor:
    """What the heads read: (B, pooled_dim), or (B, 2, D) for DeiT's CLS and dist heads."""
    tokens, _ = model.forward_features(pixels)  # B,T,D
    if model.head_dist is not None:
        return tokens[:, :2]  # B,2,D: CLS and dist, read by forward_head
    return model.pool(tokens)


def head_logits(model: ViT, features: torch.Tensor) -> torch.Tensor:
    if model.head_dist is not None:
        return model.forward_head(features)  # the mean of both heads, as at inference
    return model.head(features)


class ProbeNet(torch.nn.Module):
    """The net the loop trains: heads on cached features, or on a frozen backbone's."""

    def __init__(self, model: ViT, cached: bool) -> None:
        super().__init__()
        self.model = model
        self.cached = cached

    def train(self, mode: bool = True) -> ProbeNet:
        super().train(mode)
        self.model.eval()  # a frozen backbone keeps its eval behaviour (no dropout/drop-path)
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.cached:
            return head_logits(self.model, inputs)
        with torch.no_grad():
            features = head_input(self.model, inputs)
        return head_logits(self.model, features)


@dataclass
class FeatureBatch:
    """A LabelledBatch look-alike whose pixel_tensor() is the cached head input."""

    indices: list[int]
    features: torch.Tensor
    labels: torch.Tensor
    failures: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    def pixel_tensor(self) -> torch.Tensor:
        return self.features

    def label_tensor(self) -> torch.Tensor:
        return self.labels


class FeatureLoader:
    """Batches of cached features in the EpochSampler's order (the same order, sharding and
    length the image loader would have), images that failed to decode reported as failures."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        failures: dict[int, str],
        sampler: EpochSampler,
        batch_size: int,
    ) -> None:
        self.features, self.labels, self.failures = features, labels, failures
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[FeatureBatch]:
        keys = [index for index, _ in self.sampler]
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            good = [index for index in chunk if index not in self.failures]
            chosen = torch.tensor(good, dtype=torch.int64)
            yield FeatureBatch(
                indices=good,
                features=self.features[chosen],
                labels=self.labels[chosen],
                failures=[
                    (index, self.failures[index]) for index in chunk if index in self.failures
                ],
            )


@torch.no_grad()
def cache_features(
    model: ViT,
    data: LabelledImages,
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int,
    workers: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """(features (N, ...) on `device`, labels (N,), {index: error}) for every training image,
    through the model's eval preprocessing. Every process computes all of them (once)."""
    was_training = model.training
    model.eval()
    loader = make_loader(
        FolderDataset(data, preprocess), ShardSampler(len(data)), batch_size, workers
    )
    features: torch.Tensor | None = None
    labels = torch.tensor([label for _, label in data.samples], dtype=torch.int64)
    failures: dict[int, str] = {}
    for batch in loader:
        failures.update(batch.failures)
        if not len(batch):
            continue
        pixels = normalize(batch.pixel_tensor(), preprocess, device)  # B,C,H,W
        rows = head_input(model, pixels).float()
        if features is None:
            features = torch.zeros((len(data), *rows.shape[1:]), device=device)
        features[torch.tensor(batch.indices, device=device)] = rows
    model.train(was_training)
    if features is None:  # nothing decoded: the loop reports "no image could be decoded"
        features = torch.zeros((len(data), model.config.pooled_dim), device=device)
    return features, labels.to(device), failures
