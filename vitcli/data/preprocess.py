"""Preprocessing as data: everything a home library's evaluation transform does, exactly.

A `Preprocess` says how a decoded image becomes the model input, in the terms the home
libraries use: how to decode (EXIF orientation, RGB conversion), how to resize (to a fixed
height x width, or the shorter side to an edge, or timm's keep-ratio cover), the resample
filter and which library's resize (PIL, or torchvision's antialiased tensor resize that
transformers 5 runs by default), the centre crop and its rounding rule (torchvision rounds,
transformers floors), rescale, mean and std. Each checkpoint loader reads it from its home's
config (preprocessor_config.json, timm's pretrained_cfg, the originals' recipes) and records
where each value came from (`origins`); a value the home would treat differently from what
can be reproduced here is refused there, never approximated.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field, replace
from functools import lru_cache

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
# torchvision's tensor resize modes for our filter names (transformers maps PIL's NEAREST to
# NEAREST_EXACT); box and hamming have no tensor resize.
TORCH_MODES = {
    "nearest": "nearest-exact",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos",
}
RESIZE_MODES = ("squash", "shorter")
CROP_RULES = ("round", "floor")
BACKENDS = ("pil", "torch")
RGB_MODES = ("pil", "hf", "viewer", "late")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bounds that keep a checkpoint's recipe from asking for absurd images: the model input side,
# and the side an image is resized to before a center crop.
MAX_SIZE = 4096
MAX_RESIZED = 8192


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the original image (pixels of the original).

    The model input of size (height, width) is the region `box` = (left, top, right, bottom)
    of the original image, stretched; a squash maps the whole image, a center crop a part.
    """

    original_size: tuple[int, int]  # (width, height) of the decoded original
    box: tuple[float, float, float, float]
    exif: bool = True  # whether the original was turned upright by its EXIF orientation


@dataclass(frozen=True)
class Preprocess:
    """One checkpoint's evaluation transform.

    resize "squash": to `resize_size` (height, width), aspect not kept. "shorter": aspect
    kept; with a square `resize_size` (E, E) the shorter side becomes E and the longer
    int(E * long / short) (torchvision's Resize(int), transformers' shortest_edge); with a
    non-square one, timm's ResizeKeepRatio (each side round(side / min ratio)).
    `resize_size` None means floor(size / crop_pct) per side (timm's scale size). When the
    resized image is larger than `size`, a centre crop of `size` follows, its offset rounded
    (`crop` "round": torchvision, timm) or floored ("floor": transformers).
    """

    size: tuple[int, int] = (224, 224)  # model input (height, width)
    resize: str = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize_size: tuple[int, int] | None = None
    crop: str = "round"
    backend: str = "pil"  # "pil": PIL's resize; "torch": torchvision's antialiased tensor resize
    rescale: float = 1 / 255
    exif: bool = True  # apply the EXIF orientation before anything else
    # "pil": PIL's convert("RGB") as the home libraries call it (alpha dropped, 16-bit clipped);
    # "hf": "pil", then transformers' convert_to_rgb (do_convert_rgb: a colour the file marks
    # transparent is composited on white); "viewer": alpha composited on white, 16-bit scaled
    # (vitcli's own models); "late": PIL's convert after the resize and crop (OpenCLIP's order;
    # a palette image resizes as nearest).
    rgb: str = "viewer"
    # field -> where its value came from (`vit info`); not part of the recipe's identity.
    origins: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        try:
            height, width = _pair(self.size, "size")
            object.__setattr__(self, "size", (height, width))
            if self.resize_size is not None:
                object.__setattr__(self, "resize_size", _pair(self.resize_size, "resize_size"))
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
            object.__setattr__(self, "crop_pct", float(self.crop_pct))
            object.__setattr__(self, "rescale", float(self.rescale))
            object.__setattr__(self, "exif", bool(self.exif))
            object.__setattr__(self, "origins", dict(self.origins or {}))
        except (TypeError, ValueError, OverflowError):
            raise InputError(
                f"preprocessing values must be numbers: size {self.size!r}, resize_size "
                f"{self.resize_size!r}, crop_pct {self.crop_pct!r}, mean {self.mean!r}, "
                f"std {self.std!r}, rescale {self.rescale!r}"
            ) from None
        self.validate()

    def validate(self) -> None:
        """Refuse values that would divide by zero, give NaN inputs, allocate absurd images or
        need a transform that is not reproduced exactly (a crop larger than the resize)."""
        if not all(1 <= side <= MAX_SIZE for side in self.size):
            raise InputError(
                f"preprocessing size {self.size[0]}x{self.size[1]} is out of range: "
                f"each side must be 1..{MAX_SIZE} pixels"
            )
        for name, value, allowed in (
            ("resize", self.resize, RESIZE_MODES),
            ("interpolation", self.interpolation, tuple(INTERPOLATIONS)),
            ("crop", self.crop, CROP_RULES),
            ("backend", self.backend, BACKENDS),
            ("rgb", self.rgb, RGB_MODES),
        ):
            if not isinstance(value, str) or value not in allowed:
                what = "resize mode" if name == "resize" else name
                raise InputError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
        if self.backend == "torch" and self.rgb == "late":
            raise InputError("rgb 'late' (convert after the resize) needs the pil backend")
        if self.backend == "torch" and self.interpolation not in TORCH_MODES:
            raise InputError(
                f"interpolation {self.interpolation!r} has no tensor resize (torchvision's "
                f"backend supports {', '.join(TORCH_MODES)}); use the pil backend"
            )
        # crop_pct is the fraction of the resized image the center crop keeps (timm's meaning).
        if not 0.0 < self.crop_pct <= 1.0:  # also false for NaN
            raise InputError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if not (math.isfinite(self.rescale) and self.rescale > 0):
            raise InputError(f"rescale must be a positive number, got {self.rescale}")
        target_h, target_w = self.target_size()
        if max(target_h, target_w) > MAX_RESIZED:
            raise InputError(
                f"preprocessing resizes images to {target_h}x{target_w} before the crop, over "
                f"{MAX_RESIZED} pixels a side; use a crop_pct nearer 1 or a smaller size"
            )
        # The crop must fit inside every resized image: torchvision and transformers would pad
        # a larger one (differently), which nothing here reproduces.
        fit_h, fit_w = (
            (target_h, target_w)
            if self.resize == "squash" or target_h != target_w
            else (target_h, target_h)
        )
        if self.size[0] > fit_h or self.size[1] > fit_w:
            raise InputError(
                f"crop {self.size[0]}x{self.size[1]} is larger than the resized image "
                f"({target_h}x{target_w}); the home library would pad it, which is not supported"
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise InputError(f"preprocessing {name} must be 3 finite numbers, got {values}")
        if not all(s > 0 for s in self.std):
            raise InputError(f"preprocessing std must be positive (it divides), got {self.std}")

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {
            "size": list(self.size),
            "resize": self.resize,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_size": list(self.resize_size) if self.resize_size else None,
            "crop": self.crop,
            "backend": self.backend,
            "rescale": self.rescale,
            "exif": self.exif,
            "rgb": self.rgb,
        }
        if self.origins:
            data["origins"] = dict(self.origins)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        """The stored form; files written before the decode and crop fields existed read as
        vitcli's own recipe then (EXIF applied, viewer RGB, rounded crop, PIL resize)."""
        if not isinstance(data, dict):
            raise InputError(f"preprocessing must be a JSON object, not {type(data).__name__}")
        known = (
            "size",
            "resize",
            "crop_pct",
            "interpolation",
            "mean",
            "std",
            "resize_size",
            "crop",
            "backend",
            "rescale",
            "exif",
            "rgb",
            "origins",
        )
        return cls(**{k: data[k] for k in known if k in data})

    def to_json(self) -> str:
        data = self.to_dict()
        data.pop("origins", None)
        return json.dumps(data, sort_keys=True)

    def with_size(self, size: int | tuple[int, int]) -> Preprocess:
        """The same recipe for another model input size (the resize scales with it)."""
        new = _pair(size, "size")
        if new == self.size:
            return self
        resize_size = None
        if self.resize_size is not None:
            (rh, rw), (h, w) = self.resize_size, self.size
            resize_size = (math.floor(rh * new[0] / h), math.floor(rw * new[1] / w))
        return replace(self, size=new, resize_size=resize_size)

    def describe(self) -> str:
        """One line, in the home libraries' words."""
        height, width = self.size
        target_h, target_w = self.target_size()
        if self.resize == "squash":
            text = f"resize to {target_h}x{target_w}"
        elif target_h == target_w:
            text = f"shorter side to {target_h}"
        else:
            text = f"keep aspect, cover {target_h}x{target_w}"
        if (target_h, target_w) != (height, width) or self.resize == "shorter":
            text += f", centre crop {height}x{width} ({self.crop}ed offset)"
        resize_by = "PIL" if self.backend == "pil" else "torchvision tensor resize, antialias"
        return f"{text}, {self.interpolation} ({resize_by})"

    # -- geometry -------------------------------------------------------------------------
    def target_size(self) -> tuple[int, int]:
        """(height, width) of the resize target: `resize_size`, else floor(size / crop_pct)."""
        if self.resize_size is not None:
            return self.resize_size
        height, width = self.size
        return math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the original is resized to before any crop."""
        target_h, target_w = self.target_size()
        if self.resize == "squash":
            return target_w, target_h
        if target_h == target_w:
            # torchvision's Resize(int) and transformers' shortest_edge: int(), not round().
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target_h * long / short)
            return (target_h, new_long) if width <= height else (new_long, target_h)
        # timm's ResizeKeepRatio: the side with the smaller ratio reaches its target.
        ratio = min(height / target_h, width / target_w)
        return round(width / ratio), round(height / ratio)

    def crop_box(self, resized_w: int, resized_h: int) -> tuple[int, int, int, int]:
        """The center crop (left, top, right, bottom) in resized pixels."""
        out_h, out_w = self.size
        if self.crop == "floor":  # transformers: int((H - h) / 2)
            top, left = (resized_h - out_h) // 2, (resized_w - out_w) // 2
        else:  # torchvision: int(round((H - h) / 2)), round half to even
            top = int(round((resized_h - out_h) / 2.0))
            left = int(round((resized_w - out_w) / 2.0))
        return left, top, left + out_w, top + out_h

    def geometry(self, width: int, height: int) -> Geometry:
        resized_w, resized_h = self.resized_size(width, height)
        if (resized_w, resized_h) == (self.size[1], self.size[0]):
            return Geometry(
                (width, height), (0.0, 0.0, float(width), float(height)), exif=self.exif
            )
        left, top, right, bottom = self.crop_box(resized_w, resized_h)
        sx, sy = width / resized_w, height / resized_h
        box = (left * sx, top * sy, right * sx, bottom * sy)
        return Geometry((width, height), box, exif=self.exif)

    # -- the transform --------------------------------------------------------------------
    def pixels(
        self, image: Image.Image, original_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """An RGB image -> (C, H, W) uint8 model-size pixels: resize, then centre crop.

        `original_size` is the full-resolution (width, height) when `image` was decoded in
        JPEG draft mode at a reduced scale (`--fast-decode`): the target is computed from the
        original so the geometry is the one a full decode would have had.
        """
        width, height = original_size or image.size
        resized_w, resized_h = self.resized_size(width, height)
        crop = None
        if (resized_w, resized_h) != (self.size[1], self.size[0]):
            crop = self.crop_box(resized_w, resized_h)
        if self.backend == "torch":
            return self._pixels_torch(image, (resized_h, resized_w), crop)
        if image.size != (resized_w, resized_h):
            image = image.resize(
                (resized_w, resized_h), resample=INTERPOLATIONS[self.interpolation]
            )
        if crop is not None:
            image = image.crop(crop)
        if image.mode != "RGB":  # rgb "late": the decoder left the image in its own mode
            image = image.convert("RGB")
        return to_chw(image)

    def resize_image(
        self, image: Image.Image, original_size: tuple[int, int] | None = None
    ) -> Image.Image:
        """`pixels` as a PIL image (for drawing and for callers that want a picture)."""
        return Image.fromarray(self.pixels(image, original_size).transpose(1, 2, 0))

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """(C, H, W) uint8 of an image already at the model size."""
        return to_chw(image)

    def _pixels_torch(
        self,
        image: Image.Image,
        resized_hw: tuple[int, int],
        crop: tuple[int, int, int, int] | None,
    ) -> np.ndarray:
        """torchvision's resize of a uint8 CHW tensor, as transformers' default backend calls
        it (tvF.resize(..., antialias=True)), then the crop: same kernels, same casts."""
        import torch  # here: the recipe itself is plain data, importable without torch

        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        x = x[None]  # 1,C,H,W
        if tuple(x.shape[-2:]) != resized_hw:
            mode = TORCH_MODES[self.interpolation]
            smooth = mode != "nearest-exact"
            native = mode != "bilinear" or _native_uint8_bilinear()
            source = x if native else x.to(torch.float32)
            y = torch.nn.functional.interpolate(
                source,
                size=list(resized_hw),
                mode=mode,
                align_corners=False if smooth else None,
                antialias=smooth,
            )
            if not native:
                y = y.round_().to(torch.uint8)
            x = y
        if crop is not None:
            left, top, right, bottom = crop
            x = x[..., top:bottom, left:right]
        return np.ascontiguousarray(x[0].numpy())


@lru_cache(maxsize=1)
def _native_uint8_bilinear() -> bool:
    """torchvision resizes uint8 bilinear natively only on AVX2/AVX-512 x86 and on Arm;
    elsewhere through float32 and a rounding cast. Mirrored so the bytes are the same."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def to_chw(image: Image.Image) -> np.ndarray:
    """(C, H, W) uint8 of an RGB image."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def _whole(value: object, name: str) -> int:
    """An integer given as int or integral float (JSON has one number type); bool is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{name} {value!r} is not a whole number")
    return int(value)


def _pair(value: object, name: str) -> tuple[int, int]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} {value!r} is not (height, width)")
    return _whole(value[0], name), _whole(value[1], name)


def timm_default(size: int = 224, crop_pct: float = 0.9) -> Preprocess:
    """timm's eval transform for vit_* architectures (pretrained_cfg defaults)."""
    return Preprocess(
        size=(size, size),
        resize="shorter",
        crop_pct=crop_pct,
        interpolation="bicubic",
        crop="round",
        exif=False,
        rgb="pil",
    )
