"""The options of `vit train`, checked once, and their defaults resolved once.

`TrainConfig` holds one field per CLI option (None: "the default for this mode"). `resolve`
turns it into a `ResolvedConfig`, whose fields have concrete types: from there on nothing
downstream asks what None means. `check` validates every value (finite, in range) and names
the option in its one-line error, so that no value can hang or blow up a run later; it runs on
the command line's options and again on a resumed run's config.json.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ... import runtime
from ...errors import InputError, OptionError, TrainingError
from ...model.config import is_variant
from ...runtime import check_batch_size, check_workers
from ..train_choices import Amp, Pool, PosEmbed

# Bounds that keep every run finite and allocatable; generous for real use.
MAX_EPOCHS = 100_000
MAX_IMAGE_SIZE = runtime.MAX_IMAGE_SIDE
MAX_ALPHA = 100.0  # Beta(alpha, alpha) of mixup/cutmix; huge alphas make betavariate spin
MAX_RANDAUGMENT_OPS = 16
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; seed + epoch must stay inside
ARCH_LIMITS = {"depth": 256, "width": 16_384, "num_heads": 1024, "mlp_dim": 65_536}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `vit train`, one field per option; None means "the default of the
    mode" (from scratch or fine-tune), or for the architecture fields "the variant's value"."""

    data: str = ""
    out: str = ""
    resume: str = ""  # a run folder to continue (--resume); then out is that folder
    model: str = "Ti/16"  # a variant (train from scratch) or a model reference (fine-tune)
    epochs: int | None = None  # scratch 30, fine-tune 10
    batch_size: int = 64  # per process
    image_size: int | None = None  # scratch 224, fine-tune: the model's
    lr: float | None = None  # scratch 1e-3, fine-tune 1e-4 (peak, after warmup)
    min_lr: float = 1e-6
    weight_decay: float | None = None  # 0.05 for both (decoupled, AdamW)
    warmup_epochs: float | None = None  # scratch min(5, 10% of epochs), fine-tune 10%
    beta2: float = 0.999
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    ema: float = 0.0  # EMA decay per step (e.g. 0.999); 0 = off
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0
    randaugment: int = 0  # ops per image; 0 = off
    randaugment_magnitude: int = 9  # 0..10
    crop_scale: float | None = None  # smallest random-resized-crop area: scratch 0.35, ft 0.5
    hflip: bool = True
    pos_embed: str = PosEmbed.learned.value  # from scratch only
    pool: str = Pool.cls.value  # from scratch only
    depth: int | None = None  # from scratch only: the variant's value unless given
    width: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    dropout: float = 0.0
    drop_path: float = 0.0
    seed: int = 0
    val: str = ""  # a validation folder
    val_split: float = 0.0  # or this fraction of each class held out
    workers: int | None = None  # decoding processes; None: runtime.default_training_workers()
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = Amp.auto.value  # auto: bf16 where native and measured faster (train/amp.py)
    linear_probe: bool = False  # fine-tune only: freeze the backbone, train a new head

    @property
    def finetune(self) -> bool:
        return not is_variant(self.model)

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class ResolvedConfig(TrainConfig):
    """A TrainConfig with the mode's defaults filled in (what config.json records)."""

    epochs: int = 30
    image_size: int = 224
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    crop_scale: float = 0.35
    workers: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("resume")
        return data


def resolve(config: TrainConfig, image_size: int, workers: int) -> ResolvedConfig:
    """The defaults of the mode filled in once. `image_size` is the input side the run trains
    at (the fine-tuned model's own when --image-size is not given); `workers` comes from
    runtime.resolve_workers."""
    finetune = config.finetune
    epochs = config.epochs if config.epochs is not None else (10 if finetune else 30)
    warmup = config.warmup_epochs
    if warmup is None:
        warmup = 0.1 * epochs if finetune else min(5.0, 0.1 * epochs)
    values: dict[str, Any] = {
        **asdict(config),
        "epochs": epochs,
        "image_size": image_size,
        # A linear probe trains one layer: a larger step, as in DINOv2's and CLIP's evaluations.
        "lr": config.lr
        if config.lr is not None
        else (1e-4 if finetune and not config.linear_probe else 1e-3),
        "weight_decay": config.weight_decay if config.weight_decay is not None else 0.05,
        "warmup_epochs": warmup,
        "crop_scale": config.crop_scale
        if config.crop_scale is not None
        else (0.5 if finetune else 0.35),
        "workers": workers,
    }
    resolved = ResolvedConfig(**values)
    check(resolved)
    return resolved


# -- validation -------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + {"num_heads": "heads"}.get(name, name).replace("_", "-")


def _number(name: str, value: Any, kind: type, low: float, high: float, note: str = "") -> None:
    """Raise InputError unless `value` is a finite `kind` in [low, high]."""
    flag = _flag(name)
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise OptionError(f"{flag} must be {wanted}, got {value!r}")
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        span = f"from {low} to {high}" if kind is int else f"from {low:g} to {high:g}"
        raise OptionError(f"{flag} must be {wanted} {span}{note}, got {value!r}")


def check(config: TrainConfig) -> None:
    """Every value finite and in range, or one InputError naming the option."""
    optional_ints = {
        "epochs": (1, MAX_EPOCHS),
        "image_size": (8, MAX_IMAGE_SIZE),
        **{name: (1, high) for name, high in ARCH_LIMITS.items()},
    }
    for name, (low, high) in optional_ints.items():
        value = getattr(config, name)
        if value is not None:
            _number(name, value, int, low, high)
    check_batch_size(config.batch_size)
    if config.lr is not None:
        _number("lr", config.lr, float, 0.0, math.inf)
        if config.lr <= 0:
            raise OptionError(f"--lr must be a positive number, got {config.lr!r}")
    _number("min_lr", config.min_lr, float, 0.0, math.inf)
    if config.lr is not None and config.min_lr > config.lr:
        raise OptionError(
            f"--min-lr {config.min_lr:g} is above --lr {config.lr:g}; "
            "the cosine goes down to --min-lr, so pass a smaller one"
        )
    if config.weight_decay is not None:
        _number("weight_decay", config.weight_decay, float, 0.0, 1e6)
    if config.warmup_epochs is not None:
        most = float(config.epochs) if config.epochs is not None else float(MAX_EPOCHS)
        _number("warmup_epochs", config.warmup_epochs, float, 0.0, most, " (at most --epochs)")
    _number("beta2", config.beta2, float, 0.0, 1.0)
    if not 0.0 < config.beta2 < 1.0:
        raise OptionError(f"--beta2 must be between 0 and 1 (exclusive), got {config.beta2!r}")
    _number("label_smoothing", config.label_smoothing, float, 0.0, 0.99)
    _number("grad_clip", config.grad_clip, float, 0.0, 1e12, " (0 turns clipping off)")
    _number("ema", config.ema, float, 0.0, 0.99999999, " (a decay such as 0.999; 0 is off)")
    _number("mixup", config.mixup, float, 0.0, MAX_ALPHA, " (0 is off; try 0.8)")
    _number("cutmix", config.cutmix, float, 0.0, MAX_ALPHA, " (0 is off; try 1.0)")
    _number("randaugment", config.randaugment, int, 0, MAX_RANDAUGMENT_OPS)
    _number("randaugment_magnitude", config.randaugment_magnitude, int, 0, 10)
    if config.crop_scale is not None:
        _number("crop_scale", config.crop_scale, float, 0.0, 1.0)
        if config.crop_scale <= 0:
            raise OptionError(f"--crop-scale must be above 0 (at most 1), got {config.crop_scale}")
    _number("dropout", config.dropout, float, 0.0, 0.9)
    _number("drop_path", config.drop_path, float, 0.0, 0.9)
    _number("seed", config.seed, int, 0, MAX_SEED, " (2^63-1)")
    _number("val_split", config.val_split, float, 0.0, 0.99)
    if config.workers is not None:
        check_workers(config.workers)
    for name, choices in (("pos_embed", PosEmbed), ("pool", Pool), ("amp", Amp)):
        value = getattr(config, name)
        if value not in {choice.value for choice in choices}:
            allowed = ", ".join(choice.value for choice in choices)
            raise OptionError(f"{_flag(name)} must be one of {allowed}, got {value!r}")
    if not isinstance(config.hflip, bool):
        raise OptionError(f"--hflip must be true or false, got {config.hflip!r}")
    if not isinstance(config.linear_probe, bool):
        raise OptionError(f"--linear-probe must be true or false, got {config.linear_probe!r}")
    if config.linear_probe and not config.finetune:
        raise OptionError(
            f"--linear-probe trains a head on a trained backbone; pass --model with a "
            f"checkpoint, not the variant {config.model!r}"
        )
    for name in ("data", "out", "resume", "model", "val", "device"):
        if not isinstance(getattr(config, name), str):
            raise OptionError(f"{_flag(name)} must be text, got {getattr(config, name)!r}")
    if config.val and config.val_split > 0:
        raise OptionError("pass either --val DIR or --val-split F, not both")


# -- config.json of a run ---------------------------------------------------------------------
_HINTS = typing.get_type_hints(ResolvedConfig)


def _fits(value: Any, hint: Any) -> bool:
    kinds = typing.get_args(hint) or (hint,)
    for kind in kinds:
        if kind is type(None) and value is None:
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind in (str, bool) and isinstance(value, kind):
            return True
    return False


def _upgrade(data: dict) -> dict:
    """config.json of runs started before the options were resolved in full: `val` was null
    without a validation folder, and `image_size` null when the model's own was kept."""
    data = dict(data)
    data.setdefault("linear_probe", False)  # runs from before --linear-probe existed
    if "val" in data and data["val"] is None:
        data["val"] = ""
    model_config = data.get("model_config")
    if data.get("image_size", 0) is None and isinstance(model_config, dict):
        size = model_config.get("image_size")
        if isinstance(size, list) and size and isinstance(size[0], int):
            data["image_size"] = size[0]
    return data


def config_from_saved(data: Any, where: Path) -> ResolvedConfig:
    """The ResolvedConfig stored in a run's config.json, checked field by field: a file edited
    by hand or damaged gives one TrainingError naming the field, never a traceback."""
    if not isinstance(data, dict):
        raise TrainingError(
            f"{where}: not a training configuration (a JSON object was expected); "
            "this folder cannot be resumed, start a new run"
        )
    data = _upgrade(data)
    values: dict[str, Any] = {}
    for item in fields(ResolvedConfig):
        if item.name == "resume":
            continue
        if item.name not in data:
            raise TrainingError(f"{where}: the field {item.name!r} is missing; cannot resume")
        value = data[item.name]
        if not _fits(value, _HINTS[item.name]):
            raise TrainingError(
                f"{where}: the field {item.name!r} has the wrong type ({value!r}); cannot resume"
            )
        values[item.name] = float(value) if _HINTS[item.name] is float else value
    config = ResolvedConfig(**values)
    try:
        check(config)
    except InputError as error:
        raise TrainingError(f"{where}: {error}; cannot resume") from None
    return config
