"""Each home's evaluation transform, read into a `Preprocess` with where each value came from.

- transformers: preprocessor_config.json over its image processor class's defaults, as
  AutoImageProcessor builds it; the pipeline's decode (`load_image`: EXIF orientation, then
  PIL's convert("RGB")); the torchvision backend that transformers 5 runs by default when
  torchvision is installed (VITCLI_HF_BACKEND=pil reproduces its PIL backend instead).
- timm: pretrained_cfg over resolve_data_config's defaults, create_transform's eval path on a
  PIL image from `Image.open(path).convert("RGB")` (no EXIF orientation, as timm's datasets).
- originals: DINO / DINOv2's eval_linear transform, OpenCLIP's image_transform.

A value the home would honour but that is not reproduced exactly is refused, naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..data.preprocess import IMAGENET_MEAN, IMAGENET_STD, PIL_RESAMPLE, Preprocess
from ..errors import CheckpointError, VitError
from .files import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)

# transformers' image processor classes that vitcli reproduces: their class defaults (what a
# key missing from preprocessor_config.json means) and how an integer `size` is read
# (get_size_dict's default_to_square).
HF_PROCESSORS: dict[str, dict] = {
    "ViTImageProcessor": dict(
        resample=2, image_mean=_HALF, image_std=_HALF, size={"height": 224, "width": 224},
        do_center_crop=False, crop_size=None, square=True,
    ),
    "DeiTImageProcessor": dict(
        resample=3, image_mean=_HALF, image_std=_HALF, size={"height": 256, "width": 256},
        do_center_crop=True, crop_size={"height": 224, "width": 224}, square=True,
    ),
    "CLIPImageProcessor": dict(
        resample=3, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        size={"shortest_edge": 224}, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, square=False, do_convert_rgb=True,
    ),
    "BitImageProcessor": dict(
        resample=3, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        size={"shortest_edge": 224}, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, square=False, do_convert_rgb=True,
    ),
    "SiglipImageProcessor": dict(
        resample=3, image_mean=_HALF, image_std=_HALF, size={"height": 224, "width": 224},
        do_center_crop=False, crop_size=None, square=True, do_convert_rgb=True,
    ),
}  # fmt: skip
# AutoImageProcessor's choice when preprocessor_config.json names no class.
HF_MODEL_PROCESSORS = {
    "vit": "ViTImageProcessor",
    "deit": "DeiTImageProcessor",
    "clip": "CLIPImageProcessor",
    "clip_vision_model": "CLIPImageProcessor",
    "dinov2": "BitImageProcessor",
    "dinov2_with_registers": "BitImageProcessor",
    "siglip": "SiglipImageProcessor",
    "siglip_vision_model": "SiglipImageProcessor",
}
HF_BACKENDS = {"torchvision": "torch", "pil": "pil"}


def hf_backend() -> str:
    """Which transformers backend HF checkpoints reproduce: its default, torchvision, unless
    VITCLI_HF_BACKEND=pil."""
    name = os.environ.get("VITCLI_HF_BACKEND", "").strip().lower() or "torchvision"
    if name not in HF_BACKENDS:
        raise VitError(
            f"VITCLI_HF_BACKEND={name!r}: use torchvision (transformers' default) or pil"
        )
    return name


def processor_name(spec: dict, model_type: object) -> str | None:
    """The image processor class a preprocessor_config.json names (the Fast/Pil variants and
    the old FeatureExtractor names share one recipe), else AutoImageProcessor's for the
    model type."""
    name = spec.get("image_processor_type") or spec.get("feature_extractor_type")
    if isinstance(name, str) and name:
        name = name.replace("FeatureExtractor", "ImageProcessor")
        for suffix in ("Fast", "Pil"):
            name = name.removesuffix(suffix)
        return name
    return HF_MODEL_PROCESSORS.get(model_type) if isinstance(model_type, str) else None


def preprocess_from_hf(folder: Path, image_size: tuple[int, int]) -> tuple[Preprocess, list[str]]:
    """preprocessor_config.json as transformers' pipeline applies it; notes for `vit info`."""
    path = folder / "preprocessor_config.json"
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    model_type = config.get("model_type") if isinstance(config, dict) else None
    notes: list[str] = []
    if not path.is_file():
        spec: dict = {}
        notes.append(
            "no preprocessor_config.json: the image processor's class defaults "
            f"({processor_name({}, model_type) or 'ViTImageProcessor'}) at the model size"
        )
        if processor_name({}, model_type) in (None, "ViTImageProcessor"):
            height, width = image_size
            spec = {"size": {"height": height, "width": width}}
    else:
        spec = read_json(path)
        if not isinstance(spec, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
    where = str(path)
    with _unusable(where, "preprocessing"):
        return hf_recipe(spec, model_type, where), notes


@contextmanager
def _unusable(where: str, what: str) -> Iterator[None]:
    """A recipe that cannot be read, as one CheckpointError naming the file: Preprocess' own
    InputErrors and the values a stranger's JSON can hold (wrong types, missing keys)."""
    try:
        yield
    except CheckpointError:
        raise  # already names the file
    except (VitError, ValueError, TypeError, ArithmeticError, AttributeError, IndexError,
            KeyError) as error:  # fmt: skip
        raise CheckpointError(f"{where}: unusable {what} ({error})") from None


def hf_recipe(spec: dict, model_type: object, where: str) -> Preprocess:
    name = processor_name(spec, model_type) or "ViTImageProcessor"
    defaults = HF_PROCESSORS.get(name)
    if defaults is None:
        raise CheckpointError(
            f"{where}: image_processor_type {name!r} is not reproduced exactly by vitcli "
            f"(supported: {', '.join(HF_PROCESSORS)})"
        )
    file = Path(where).name
    origins: dict[str, str] = {}

    def value(key: str, fallback: object = None) -> object:
        if spec.get(key) is not None:
            origins[key] = f"{file} {key}"
            return spec[key]
        origins[key] = f"{name} default"
        return defaults.get(key, fallback)

    if not value("do_resize", True):
        raise CheckpointError(
            f"{where}: do_resize is false (images keep their own size); vitcli needs one "
            "input size: set do_resize true or pass a folder with a resize"
        )
    size = _size_dict(value("size"), defaults["square"], "size")
    resample = value("resample")
    if isinstance(resample, bool) or not isinstance(resample, (int, str)):
        raise CheckpointError(f"{where}: resample {resample!r} is not a PIL filter")
    interpolation = PIL_RESAMPLE.get(resample) if isinstance(resample, int) else resample
    if interpolation is None:
        raise CheckpointError(f"{where}: resample {resample} is not a PIL filter (0..5)")
    crop = None
    if value("do_center_crop", False):
        crop = _size_dict(value("crop_size"), True, "crop_size")
        if "height" not in crop:
            raise CheckpointError(f"{where}: crop_size {crop} has no height and width")
    if "shortest_edge" in size:
        if set(size) != {"shortest_edge"}:
            raise CheckpointError(
                f"{where}: size {size} (a longest_edge or max size too) is not reproduced; "
                "supported: height and width, or shortest_edge with a centre crop"
            )
        if crop is None:
            raise CheckpointError(
                f"{where}: size.shortest_edge without a centre crop gives every image its own "
                "shape; vitcli needs one input size (set do_center_crop and crop_size)"
            )
        edge = int(size["shortest_edge"])
        resize, resize_size = "shorter", (edge, edge)
    elif "height" in size and "width" in size:
        resize, resize_size = "squash", (int(size["height"]), int(size["width"]))
    else:
        raise CheckpointError(
            f"{where}: size {size} has neither height and width nor shortest_edge"
        )
    model_size = (int(crop["height"]), int(crop["width"])) if crop else resize_size
    factor = value("rescale_factor", 1 / 255)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise CheckpointError(f"{where}: rescale_factor {factor!r} is not a number")
    rescale = float(factor) if value("do_rescale", True) else 1.0
    if value("do_normalize", True):
        mean, std = value("image_mean"), value("image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = _triple(mean, "image_mean", where), _triple(std, "image_std", where)
    backend = hf_backend()
    origins["backend"] = (
        "VITCLI_HF_BACKEND" if os.environ.get("VITCLI_HF_BACKEND") else "transformers 5 default"
    )
    convert = bool(value("do_convert_rgb", False))
    origins["decode"] = "transformers' load_image (EXIF orientation, convert('RGB'))" + (
        ", then convert_to_rgb" if convert else ""
    )
    return Preprocess(
        size=model_size,
        resize=resize,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
        crop="floor",
        backend=HF_BACKENDS[backend],
        rescale=rescale,
        exif=True,
        rgb="hf" if convert else "pil",
        origins=origins,
    )


def _size_dict(value: object, square: bool, key: str) -> dict:
    """transformers' get_size_dict: an int is a square (or a shortest edge where the class does
    not default to square), a pair is (height, width)."""
    if isinstance(value, bool):
        raise ValueError(f"{key} {value!r} is not a size")
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    raise ValueError(f"{key} {value!r} is not a size")


def _triple(value: object, key: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise CheckpointError(f"{where}: {key} {value!r} is not 3 numbers")
    return (float(value[0]), float(value[1]), float(value[2]))


# -- timm ----------------------------------------------------------------------------------
TIMM_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def preprocess_from_timm(
    pretrained: dict, image_size: tuple[int, int], where: str = "pretrained_cfg"
) -> tuple[Preprocess, list[str]]:
    """timm's create_transform(is_training=False) for this pretrained_cfg."""
    with _unusable(where, "timm preprocessing"):
        return timm_recipe(pretrained, image_size, where), []


def timm_recipe(pretrained: dict, image_size: tuple[int, int], where: str) -> Preprocess:
    origins: dict[str, str] = {}

    def value(key: str, fallback: object) -> object:
        if pretrained.get(key):  # resolve_data_config treats 0, "" and None as unset
            origins[key] = f"pretrained_cfg {key}"
            return pretrained[key]
        origins[key] = "timm default"
        return fallback

    input_size = value("input_size", None)
    if input_size:
        size = (int(input_size[-2]), int(input_size[-1]))  # type: ignore[index]
    else:
        size = image_size
        origins["input_size"] = "the model's image size"
    crop_pct = float(value("crop_pct", 0.875))  # type: ignore[arg-type]
    crop_mode = value("crop_mode", "center")
    interpolation = value("interpolation", "bicubic")
    if interpolation not in TIMM_INTERPOLATIONS:
        raise CheckpointError(
            f"{where}: unknown interpolation {interpolation!r}: timm's are "
            f"{', '.join(TIMM_INTERPOLATIONS)}"
        )
    if crop_mode not in ("center", "squash"):
        raise CheckpointError(
            f"{where}: crop_mode {crop_mode!r} is not reproduced exactly "
            "(supported: center, squash)"
        )
    if crop_pct > 1.0:
        raise CheckpointError(
            f"{where}: crop_pct {crop_pct:g} is over 1 (timm pads the image); not reproduced"
        )
    mean = _triple(value("mean", IMAGENET_MEAN), "mean", where)
    std = _triple(value("std", IMAGENET_STD), "std", where)
    origins["decode"] = "timm's dataset (convert('RGB'), no EXIF orientation)"
    return Preprocess(
        size=size,
        resize="squash" if crop_mode == "squash" else "shorter",
        crop_pct=crop_pct,
        interpolation=str(interpolation),
        mean=mean,
        std=std,
        crop="round",
        backend="pil",
        exif=False,
        rgb="pil",
        origins=origins,
    )


# -- the original releases -----------------------------------------------------------------
def dino_recipe(size: tuple[int, int] = (224, 224)) -> Preprocess:
    """DINO's and DINOv2's eval_linear: Resize(256, bicubic), CenterCrop(224), ImageNet
    mean/std, on ImageFolder's convert("RGB") (no EXIF orientation)."""
    return Preprocess(
        size=size,
        resize="shorter",
        resize_size=(256 * size[0] // 224, 256 * size[0] // 224),
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop="round",
        exif=False,
        rgb="pil",
        origins={"recipe": "DINO / DINOv2 eval_linear.py"},
    )


def openclip_recipe(recipe: dict, vision: dict, size: tuple[int, int], where: str) -> Preprocess:
    """OpenCLIP's image_transform(is_train=False): Resize, CenterCrop, then _convert_to_rgb
    (after the resize: a palette image is resized with nearest, as PIL does), ToTensor,
    Normalize."""
    mode = recipe.get("resize_mode") or "shortest"
    if mode not in ("shortest", "squash"):
        raise CheckpointError(
            f"{where}: preprocess_cfg resize_mode {mode!r} is not reproduced exactly "
            "(supported: shortest, squash)"
        )
    interpolation = recipe.get("interpolation") or "bicubic"
    if interpolation not in ("bicubic", "bilinear", "nearest", "lanczos"):
        raise CheckpointError(f"{where}: preprocess_cfg interpolation {interpolation!r}")
    mean = recipe.get("mean") or vision.get("image_mean") or OPENAI_CLIP_MEAN
    std = recipe.get("std") or vision.get("image_std") or OPENAI_CLIP_STD
    origins = {"recipe": "OpenCLIP image_transform", "resize_mode": f"preprocess_cfg ({mode})"}
    height, width = size
    return Preprocess(
        size=size,
        resize="squash" if mode == "squash" else "shorter",
        # torchvision Resize(size) with a square size: the shorter side to it.
        resize_size=None if mode == "squash" or height != width else (height, height),
        interpolation=interpolation,
        mean=_triple(mean, "mean", where),
        std=_triple(std, "std", where),
        crop="round",
        exif=False,
        rgb="late",
        origins=origins,
    )
