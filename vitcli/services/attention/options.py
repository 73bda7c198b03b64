"""Everything `vit attention` can be asked, as one frozen object with its defaults resolved.

Each field maps onto one CLI option. Construction validates every value (a one-line
`InputError` naming the option), so the run never meets a bad or absurd value: numbers are
finite and in range, choices are Enums. Two things can only be checked against the model and
are resolved in `run`: the layer indices (`parse_layers`, against its depth) and
`batch_size="auto"` (`default_batch_size`, from its size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from ...errors import InputError, OptionError
from ...runtime import BatchOptions, render_threads

TILE_RANGE = (32, 1024)  # a sheet tile's long side, pixels; larger ones only make huge sheets
MAX_BLUR = 10_000.0  # pixels of the original; far blurrier than any useful overlay
MASK_ALPHA = 0.7  # --style mask: unattended parts keep 1 - 0.7 = 30% of their brightness


class Choice(str, Enum):
    """A named choice of an option; str() and f-strings give its value on every Python."""

    def __str__(self) -> str:
        return str(self.value)


class HeadFusion(Choice):
    mean = "mean"
    max = "max"
    min = "min"


class Style(Choice):
    heatmap = "heatmap"  # colormap blended with alpha
    mask = "mask"  # the image dimmed where attention is low (the paper's Fig. 6), to 30% at 0


class Colormap(Choice):  # the names of colormaps.COLORMAPS (a test keeps them equal)
    viridis = "viridis"
    inferno = "inferno"
    magma = "magma"
    plasma = "plasma"
    jet = "jet"
    gray = "gray"
    hot = "hot"


class Interpolation(Choice):
    nearest = "nearest"  # shows the true patch blocks
    bilinear = "bilinear"
    bicubic = "bicubic"


class Scale(Choice):
    per_map = "per-map"  # each map from 0 to its own peak: every target's and head's map shows
    shared = "shared"  # one range for all head and head-mean maps of an image, one per method


class MapsFormat(Choice):
    safetensors = "safetensors"
    npy = "npy"


def _choice(enum: Any, value: object, option: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise OptionError(f"unknown {option} {value!r}: use one of {allowed}") from None


def _number(value: object, option: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(f"{option} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise OptionError(f"{option} must be a finite number, got {value}")
    return number


@dataclass(frozen=True)
class AttentionOptions(BatchOptions):
    """One `vit attention` run, beside the shared BatchOptions. Strings are accepted for the
    Enum fields and converted."""

    inputs: tuple[str, ...] = ()  # files, folders, quoted globs, '-' for paths on stdin
    out: Path = Path("attention")
    # Maps
    layers: tuple[int | str, ...] = (-1,)  # per-head maps: indices (negative from the end), "all"
    heads: bool = True  # "raw": the per-head maps (and head mean) of `layers`
    # Single-map methods (methods.METHODS) drawn beside the original; () for per-head maps only.
    # "raw" may be named here too: it is taken out and turns `heads` on.
    methods: tuple[str, ...] = ("rollout",)
    # What class-specific methods explain, one map per target: top1, top2, ..., a label or a
    # class index (checked against the model's labels in `run`). Class-agnostic ones ignore it.
    targets: tuple[str, ...] = ("top1",)
    head_fusion: HeadFusion = HeadFusion.mean
    discard_ratio: float = 0.0  # rollout: lowest patch keys zeroed per row, in [0, 1)
    threshold: float | None = None  # DINO mass per head, in (0, 1]; None: no outlines
    # Pictures
    per_head: bool = False  # one PNG per overlay besides the sheet
    style: Style = Style.heatmap
    colormap: Colormap = Colormap.viridis
    # Resolved at construction: 0.5 for heatmap; 0.7 for mask, which keeps the least attended
    # parts at 30% brightness (1.0 is the paper's black).
    alpha: float | None = None
    interpolation: Interpolation = Interpolation.bilinear
    scale: Scale = Scale.per_map  # shared: one range per image for the heads, one per method
    blur: float = 0.0  # Gaussian sigma in original pixels (the paper blurs with ~P)
    tile: int = 224  # long side of a sheet tile, pixels
    individual_size: int = 1024  # cap on the long side of --per-head PNGs
    # Files
    html: bool = False
    explore: bool = False  # an explorer page (explorer.py) per image, next to its sheet
    maps_format: MapsFormat = MapsFormat.safetensors
    # Runtime
    batch_size: int | Literal["auto"] = field(default="auto", kw_only=True)  # auto: 32 or fewer
    int8: bool = False  # int8 Linear layers on the CPU (services/int8.py); no gradients
    fast_decode: bool = False  # opt-in JPEG draft decoding (not the home's pixels)
    render_threads: int = field(default_factory=render_threads)  # 0: draw inline

    def __post_init__(self) -> None:
        super().__post_init__()

        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("inputs", tuple(str(item) for item in self.inputs))
        put("out", Path(self.out).expanduser())
        put("layers", tuple(self.layers) or (-1,))
        names = tuple(dict.fromkeys(str(name).strip().lower() for name in self.methods))
        if "raw" in names:
            put("heads", True)
        put("methods", tuple(name for name in names if name != "raw"))
        put("heads", bool(self.heads))
        if not self.heads and not self.methods:
            raise InputError("no maps asked for: give at least one --method (e.g. rollout)")
        from ...explain.registry import check_method  # torch: imported when an object is made

        for name in self.methods:
            check_method(name)
        put("int8", bool(self.int8))
        if self.int8:
            refuse_gradients(self.methods, "--int8")
            from ..int8 import check_int8_options

            check_int8_options(self.device, self.dtype)
        put("targets", tuple(dict.fromkeys(str(spec).strip() for spec in self.targets)))
        if not self.targets or "" in self.targets:
            raise InputError("--target needs a value: top1, top2, ..., a label or a class index")
        if self.threshold is not None and not self.heads:
            raise InputError("--threshold outlines the per-head maps: add --method raw")
        for spec in self.layers:
            _check_layer_syntax(spec)
        put("head_fusion", _choice(HeadFusion, self.head_fusion, "--head-fusion"))
        put("style", _choice(Style, self.style, "--style"))
        put("colormap", _choice(Colormap, self.colormap, "--colormap"))
        put("interpolation", _choice(Interpolation, self.interpolation, "--interpolation"))
        put("scale", _choice(Scale, self.scale, "--scale"))
        put("maps_format", _choice(MapsFormat, self.maps_format, "--maps-format"))

        discard = _number(self.discard_ratio, "--discard-ratio")
        if not 0.0 <= discard < 1.0:
            raise OptionError(f"--discard-ratio must be in [0, 1), got {self.discard_ratio}")
        put("discard_ratio", discard)
        if self.threshold is not None:
            threshold = _number(self.threshold, "--threshold")
            if not 0.0 < threshold <= 1.0:
                raise OptionError(f"--threshold must be in (0, 1], got {self.threshold}")
            put("threshold", threshold)
        if self.alpha is None:
            put("alpha", 0.5 if self.style == Style.heatmap else MASK_ALPHA)
        else:
            alpha = _number(self.alpha, "--alpha")
            if not 0.0 <= alpha <= 1.0:
                raise OptionError(f"--alpha must be in [0, 1], got {self.alpha}")
            put("alpha", alpha)
        blur = _number(self.blur, "--blur")
        if not 0.0 <= blur <= MAX_BLUR:
            raise OptionError(
                f"--blur must be 0 to {MAX_BLUR:g} pixels of the original, got {self.blur}"
            )
        put("blur", blur)
        low, high = TILE_RANGE
        if not low <= _integer(self.tile, "--tile") <= high:
            raise OptionError(f"--tile must be {low} to {high} pixels, got {self.tile}")
        if not low <= _integer(self.individual_size, "individual_size") <= high:
            raise InputError(f"individual_size must be {low} to {high}, got {self.individual_size}")
        if _integer(self.render_threads, "render_threads") < 0:
            raise InputError(f"render_threads must be 0 or more, got {self.render_threads}")

    @property
    def overlay_alpha(self) -> float:
        """`alpha`, typed: construction has replaced None by the style's default."""
        assert self.alpha is not None
        return self.alpha

    def meta(self) -> dict:
        """The options as meta.json records them (the shape of the maps and pictures)."""
        return {
            "rollout": "rollout" in self.methods,
            "heads": self.heads,
            "methods": list(self.methods),
            "targets": list(self.targets),
            "head_fusion": self.head_fusion.value,
            "discard_ratio": self.discard_ratio,
            "threshold": self.threshold,
            "style": self.style.value,
            "colormap": self.colormap.value,
            "alpha": self.overlay_alpha,
            "interpolation": self.interpolation.value,
            "scale": self.scale.value,
            "blur": self.blur,
            "tile": self.tile,
            "individual_size": self.individual_size,
            "maps_format": self.maps_format.value,
            "per_head": self.per_head,
            "int8": self.int8,
            "decode": "fast" if self.fast_decode else "exact",
        }


def refuse_gradients(methods: Sequence[str], why: str) -> None:
    """Class-specific methods take gradients, which int8 layers do not have. `why`: what
    made the model int8 (the flag, or the file)."""
    from ...explain.registry import METHODS

    needing = [name for name in methods if METHODS[name].class_specific]
    if needing:
        raise OptionError(
            f"--method {','.join(needing)} needs gradients, which int8 layers do not have "
            f"({why}); use --method raw or rollout, or a float model"
        )


def _integer(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{option} must be a whole number, got {value!r}")
    return value


def _check_layer_syntax(spec: int | str) -> None:
    for part in str(spec).split(","):
        part = part.strip()
        if part and part.lower() != "all":
            try:
                int(part)
            except ValueError:
                raise OptionError(
                    f"--layer {part!r}: use a layer index (negative counts from the end) or 'all'"
                ) from None


def parse_layers(specs: Sequence[str | int] | None, depth: int) -> tuple[int, ...]:
    """`--layer` values -> sorted distinct indices in [0, depth). Accepts ints (negative from
    the end), comma lists ("9,10,11") and "all"; nothing means the last layer."""
    if not specs:
        return (depth - 1,)
    chosen: set[int] = set()
    for spec in specs:
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if part.lower() == "all":
                chosen.update(range(depth))
                continue
            try:
                index = int(part)
            except ValueError:
                raise OptionError(
                    f"--layer {part!r}: use a layer index (negative counts from the end) or 'all'"
                ) from None
            if not -depth <= index < depth:
                raise OptionError(
                    f"--layer {index} is out of range: this model has {depth} layers "
                    f"(0..{depth - 1}, or -1..-{depth})"
                )
            chosen.add(index % depth)
    if not chosen:
        return (depth - 1,)
    return tuple(sorted(chosen))


def default_batch_size(config: Any, budget_bytes: int = 1 << 30, factor: int = 1) -> int:
    """Predict's 32, fewer when the float32 weights of every layer (rollout keeps them all
    until the forward ends) would pass ~1 GiB: B/16 stays at 32, L/16 gets 18. `factor`: a
    method's peak memory per image over rollout's (methods.memory_factor; B/16 with gae: 12)."""
    tokens = config.num_prefix_tokens + config.num_patches
    per_image = config.depth * config.num_heads * tokens * tokens * 4
    return max(1, min(32, budget_bytes // (per_image * max(1, factor))))
