"""Training augmentation with PIL and numpy: random resized crop, flip, RandAugment-like ops,
mixup and cutmix.

Every random choice is drawn from an explicit `random.Random` that the
caller seeds from (seed, epoch, sample or step): nothing reads a global RNG, so a resumed run
sees exactly the augmentations an uninterrupted run would have seen, whatever the number of
DataLoader workers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .preprocess import INTERPOLATIONS, Preprocess

_FILL = (128, 128, 128)  # grey for pixels uncovered by geometric ops


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering `scale` of the area at aspect `ratio`
    (torchvision's RandomResizedCrop: ten tries, then the central crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


# -- RandAugment-like ops: (image, magnitude in [0, 1], rng) -> image ------------------------
def _signed(value: float, rng: random.Random) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(image: Image.Image, matrix: tuple) -> Image.Image:
    return image.transform(
        image.size,
        Image.Transform.AFFINE,
        matrix,
        resample=Image.Resampling.BILINEAR,
        fillcolor=_FILL,
    )


RAND_OPS = {
    "identity": lambda img, m, rng: img,
    "autocontrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng: ImageOps.equalize(img),
    "rotate": lambda img, m, rng: img.rotate(
        _signed(30.0 * m, rng), resample=Image.Resampling.BILINEAR, fillcolor=_FILL
    ),
    "solarize": lambda img, m, rng: ImageOps.solarize(img, threshold=int(256 - 256 * m)),
    "posterize": lambda img, m, rng: ImageOps.posterize(img, bits=max(1, 8 - int(round(4 * m)))),
    "color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1.0 + _signed(0.9 * m, rng)),
    "contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(1.0 + _signed(0.9 * m, rng)),
    "brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(
        1.0 + _signed(0.9 * m, rng)
    ),
    "sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(
        1.0 + _signed(0.9 * m, rng)
    ),
    "shear_x": lambda img, m, rng: _affine(img, (1, _signed(0.3 * m, rng), 0, 0, 1, 0)),
    "shear_y": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(0.3 * m, rng), 1, 0)),
    "translate_x": lambda img, m, rng: _affine(
        img, (1, 0, _signed(0.45 * m, rng) * img.size[0], 0, 1, 0)
    ),
    "translate_y": lambda img, m, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(0.45 * m, rng) * img.size[1])
    ),
}
_OP_NAMES = tuple(RAND_OPS)


def rand_augment(
    image: Image.Image, num_ops: int, magnitude: int, rng: random.Random
) -> Image.Image:
    """RandAugment (Cubuk et al. 2020): `num_ops` ops drawn uniformly, magnitude 0..10 for all
    (a small PIL subset; magnitudes follow timm's ranges, not the paper's exact table)."""
    strength = max(0.0, min(float(magnitude), 10.0)) / 10.0
    for _ in range(num_ops):
        image = RAND_OPS[_OP_NAMES[rng.randrange(len(_OP_NAMES))]](image, strength, rng)
    return image


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop + horizontal flip (+ RandAugment) -> (C, H, W) uint8; the model's
    normalisation happens later, on the device (data.loader.normalize)."""

    preprocess: Preprocess  # gives output size, interpolation, mean and std
    scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9

    def __call__(self, image: Image.Image, rng: random.Random) -> np.ndarray:
        out_h, out_w = self.preprocess.size
        box = random_resized_crop_box(image.size[0], image.size[1], rng, self.scale)
        image = image.resize(
            (out_w, out_h), resample=INTERPOLATIONS[self.preprocess.interpolation], box=box
        )
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment_ops > 0:
            image = rand_augment(image, self.randaugment_ops, self.randaugment_magnitude, rng)
        return self.preprocess.to_uint8(image)


def mix_batch(
    pixels: torch.Tensor,
    targets: torch.Tensor,
    mixup_alpha: float,
    cutmix_alpha: float,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al.) or cutmix (Yun et al.), one of the two per batch when both are on.

    `targets` are (B, K) probabilities; the batch is mixed with its own reverse (as timm does),
    so no extra permutation needs drawing.
    """
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or pixels.shape[0] < 2:
        return pixels, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = rng.betavariate(alpha, alpha)
    flipped = pixels.flip(0)
    if use_cutmix:
        height, width = pixels.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = rng.randrange(height), rng.randrange(width)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        pixels = pixels.clone()
        pixels[:, :, top:bottom, left:right] = flipped[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(
            height * width
        )  # the box actually pasted
    else:
        pixels = pixels * lam + flipped * (1.0 - lam)
    return pixels, targets * lam + targets.flip(0) * (1.0 - lam)
