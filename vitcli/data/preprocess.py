"""Preprocessing as a checkpoint describes it: resize, optional center crop, normalise.

Each checkpoint family preprocesses differently (HF squashes to 224 bilinear, timm resizes the
shorter side to 224/0.875 bicubic and crops): the recipe travels with the weights and is read
back from them, never assumed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from ..errors import InputError

# The one table of resampling filters: name -> PIL filter. Checkpoints that store PIL's integer
# codes (transformers' image processors) are read through PIL_RESAMPLE, derived from it.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
PIL_RESAMPLE = {int(code): name for name, code in INTERPOLATIONS.items()}
RESIZE_MODES = ("squash", "shorter")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bounds that keep a checkpoint's recipe from asking for absurd images: the model input side,
# and the side an image is resized to before a center crop (size / crop_pct).
MAX_SIZE = 4096
MAX_RESIZED = 8192


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the original image (pixels of the original).

    The model input of size (height, width) is the region `box` = (left, top, right, bottom)
    of the original image, stretched; a squash maps the whole image, a center crop a part.
    """

    original_size: tuple[int, int]  # (width, height) of the decoded, EXIF-rotated original
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int] = (224, 224)  # model input (height, width)
    resize: str = "squash"  # "squash" to size, or "shorter" side to size/crop_pct then center crop
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        try:
            size = self.size
            if isinstance(size, int):
                size = (size, size)
            height, width = (_whole(side, "size") for side in size)
            object.__setattr__(self, "size", (height, width))
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
            object.__setattr__(self, "crop_pct", float(self.crop_pct))
        except (TypeError, ValueError, OverflowError):
            raise InputError(
                f"preprocessing values must be numbers: size {self.size!r}, crop_pct "
                f"{self.crop_pct!r}, mean {self.mean!r}, std {self.std!r}"
            ) from None
        self.validate()

    def validate(self) -> None:
        """Refuse values that would divide by zero, give NaN inputs or allocate absurd images."""
        if not all(1 <= side <= MAX_SIZE for side in self.size):
            raise InputError(
                f"preprocessing size {self.size[0]}x{self.size[1]} is out of range: "
                f"each side must be 1..{MAX_SIZE} pixels"
            )
        if not isinstance(self.resize, str) or self.resize not in RESIZE_MODES:
            raise InputError(
                f"unknown resize mode {self.resize!r}: use one of {', '.join(RESIZE_MODES)}"
            )
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            raise InputError(
                f"unknown interpolation {self.interpolation!r}: "
                f"use one of {', '.join(INTERPOLATIONS)}"
            )
        # crop_pct is the fraction of the resized image the center crop keeps (timm's meaning).
        if not 0.0 < self.crop_pct <= 1.0:  # also false for NaN
            raise InputError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.resize == "shorter" and max(self.size) / self.crop_pct > MAX_RESIZED:
            raise InputError(
                f"crop_pct {self.crop_pct:g} with size {max(self.size)} resizes images to more "
                f"than {MAX_RESIZED} pixels before the crop; use a crop_pct nearer 1"
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise InputError(f"preprocessing {name} must be 3 finite numbers, got {values}")
        if not all(s > 0 for s in self.std):
            raise InputError(f"preprocessing std must be positive (it divides), got {self.std}")

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["size"] = list(self.size)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        if not isinstance(data, dict):
            raise InputError(f"preprocessing must be a JSON object, not {type(data).__name__}")
        return cls(
            **{
                k: data[k]
                for k in ("size", "resize", "crop_pct", "interpolation", "mean", "std")
                if k in data
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_size(self, size: int | tuple[int, int]) -> Preprocess:
        return replace(self, size=(size, size) if isinstance(size, int) else size)

    # -- geometry -------------------------------------------------------------------------
    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the original is resized to before any crop."""
        out_h, out_w = self.size
        if self.resize == "squash":
            return out_w, out_h
        scale_h, scale_w = math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct)
        if out_h == out_w:
            # Shorter side to floor(size / crop_pct), aspect kept (torchvision Resize(int)).
            short = scale_h
            if width <= height:
                return short, int(short * height / width)
            return int(short * width / height), short
        # Non-square target: scale so the image covers (scale_h, scale_w), aspect kept.
        factor = max(scale_h / height, scale_w / width)
        return max(scale_w, round(width * factor)), max(scale_h, round(height * factor))

    def crop_box(self, resized_w: int, resized_h: int) -> tuple[int, int, int, int]:
        """The center crop (left, top, right, bottom) in resized pixels (torchvision's rounding)."""
        out_h, out_w = self.size
        top = int(round((resized_h - out_h) / 2.0))
        left = int(round((resized_w - out_w) / 2.0))
        return left, top, left + out_w, top + out_h

    def geometry(self, width: int, height: int) -> Geometry:
        if self.resize == "squash":
            return Geometry((width, height), (0.0, 0.0, float(width), float(height)))
        resized_w, resized_h = self.resized_size(width, height)
        left, top, right, bottom = self.crop_box(resized_w, resized_h)
        sx, sy = width / resized_w, height / resized_h
        return Geometry((width, height), (left * sx, top * sy, right * sx, bottom * sy))

    # -- the transform --------------------------------------------------------------------
    def resize_image(
        self, image: Image.Image, original_size: tuple[int, int] | None = None
    ) -> Image.Image:
        """Resize (and crop) an RGB image to the model input size.

        `original_size` is the full-resolution (width, height) when `image` was decoded in
        JPEG draft mode at a reduced scale: the target is computed from the original so the
        result has exactly the geometry a full decode would have had.
        """
        width, height = original_size or image.size
        resized_w, resized_h = self.resized_size(width, height)
        resample = INTERPOLATIONS[self.interpolation]
        if image.size != (resized_w, resized_h):
            image = image.resize((resized_w, resized_h), resample=resample)
        if self.resize == "shorter":
            image = image.crop(self.crop_box(resized_w, resized_h))
        return image

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """(C, H, W) uint8: the resized pixels before normalisation (a quarter of the bytes of
        float32, so cheaper to pass between processes and to a GPU; see `normalize`)."""
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def _whole(value: object, name: str) -> int:
    """An integer given as int or integral float (JSON has one number type); bool is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{name} {value!r} is not a whole number")
    return int(value)


def timm_default(size: int = 224, crop_pct: float = 0.9) -> Preprocess:
    return Preprocess(
        size=(size, size), resize="shorter", crop_pct=crop_pct, interpolation="bicubic"
    )
