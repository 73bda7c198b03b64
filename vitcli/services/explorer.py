"""The attention explorer: one self-contained HTML page per image.

Pick a layer, a head (or their mean) and a method (raw attention or rollout), then hover or
click any patch, or a prefix token such as CLS, to see that query's attention row over the
image. Everything the page needs is inside the file: the image (JPEG, base64), the colour
tables, and the attention rows; the HTML, CSS and JavaScript come from explorer_assets/.
No framework, no network, works from a file:// URL.

Compact maps. Of every attention matrix (nh, T, T) the page keeps, per query row, the
weights on the prefix keys as float32 and the weights on the N patch keys as uint8 relative
to the row's patch maximum (one float32 scale per row), so a patch weight is off by at most
half a level in 255 of its row's maximum. The uint8 rows are deflated (zlib) and inflated by
the browser's DecompressionStream. A B/16 at 224 (12 layers x 12 heads, T = 197) stores
12*12*197*196 bytes before compression; see docs/explorer.md for measured sizes.

Rollout (Abnar & Zuidema 2020) up to layer l is R_l = Ã_l ... Ã_0, Ã = (mean over heads
of A + I) with rows renormalised; it is offered for every embedded layer l whose layers
0..l are all given.
"""

from __future__ import annotations

import base64
import io
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.preprocess import Geometry
from ..errors import InputError
from ..fileio import atomic_write_bytes
from .inspect.figures import colormap_lut, colormap_names

METHODS = ("attention", "rollout")
VIEW_LONG_SIDE = 640  # pixels of the image shown, at most (the model's view of the original)
_ASSETS = "explorer_assets"


@dataclass(frozen=True)
class ExplorerFile:
    path: Path
    size: int  # bytes of the HTML file
    payload: dict[str, int]  # bytes of each embedded part (after compression, before base64)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def quantise_rows(matrices: np.ndarray, prefix: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., T, T) row-stochastic matrices -> (patch levels uint8 (..., T, N), row scales
    float32 (..., T), prefix weights float32 (..., T, prefix)).

    A patch weight is level / 255 * scale, scale being the row's largest patch weight.
    """
    patches = matrices[..., prefix:].astype(np.float32)  # ...,T,N: keys = patches
    scales = patches.max(axis=-1)  # ...,T
    safe = np.where(scales > 0, scales, 1.0)[..., None]
    levels = np.rint(patches / safe * 255.0).clip(0, 255).astype(np.uint8)
    return levels, scales.astype(np.float32), matrices[..., :prefix].astype(np.float32)


def dequantise_rows(levels: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The inverse of `quantise_rows` for the patch part (what the page computes)."""
    return levels.astype(np.float32) / 255.0 * scales[..., None]


def rollout_matrices(
    attentions: Mapping[int, np.ndarray], layers: Sequence[int]
) -> dict[int, np.ndarray]:
    """R_l = Ã_l ... Ã_0 for each l in `layers` whose layers 0..l are all in `attentions`."""
    out: dict[int, np.ndarray] = {}
    result = None
    wanted = set(layers)
    for layer in range(max(layers, default=-1) + 1):
        if layer not in attentions:
            break
        fused = attentions[layer].astype(np.float64).mean(axis=0)  # T,T: heads averaged
        step = fused + np.eye(fused.shape[-1])  # the residual stream: Ã = A + I
        step /= step.sum(axis=-1, keepdims=True)  # rows renormalised
        result = step if result is None else step @ result
        if layer in wanted:
            out[layer] = result.astype(np.float32)
    return out


def _view_image(
    image: np.ndarray, geometry: Geometry | None, long_side: int
) -> tuple[Image.Image, bool]:
    """The part of `image` the model saw (a center crop's box, or everything), at most
    `long_side`; and whether it is a crop. `image` may be the original at any scale."""
    if image.ndim == 2:  # greyscale
        image = np.repeat(image[..., None], 3, axis=2)
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8), "RGB")
    cropped = False
    if geometry is not None:
        original_w, original_h = geometry.original_size
        sx, sy = picture.width / original_w, picture.height / original_h
        left, top, right, bottom = geometry.box
        box = (left * sx, top * sy, right * sx, bottom * sy)
        cropped = left > 0.5 or top > 0.5 or right < original_w - 0.5 or bottom < original_h - 0.5
        if cropped:
            # Sub-pixel box edges: an affine resample of exactly that region, not a rounded crop.
            width, height = max(1, round(box[2] - box[0])), max(1, round(box[3] - box[1]))
            picture = picture.transform(
                (width, height),
                Image.Transform.EXTENT,
                box,
                resample=Image.Resampling.BILINEAR,
            )
    scale = min(1.0, long_side / max(picture.size))
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return picture, cropped


def _asset(name: str) -> str:
    return (resources.files(__package__ or "vitcli.services") / _ASSETS / name).read_text(
        encoding="utf-8"
    )


def write_explorer(
    path: str | Path,
    image: np.ndarray,
    geometry: Geometry | None,
    attentions: Mapping[int, np.ndarray | torch.Tensor],
    *,
    grid_size: tuple[int, int],
    layers: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    prefix_names: Sequence[str] | None = None,
    patch_size: int | None = None,
    title: str = "",
    subtitle: str = "",
    predictions: Sequence[tuple[str, float]] = (),
    methods: Sequence[str] = METHODS,
    colormap: str = "viridis",
    compress: bool = True,
    view_long_side: int = VIEW_LONG_SIDE,
) -> ExplorerFile:
    """Write the explorer page for one image to `path` (atomically).

    image: (h, w, 3) uint8, the original image at any scale (EXIF-rotated as decoded).
    geometry: where the model input lies in the original (`Preprocess.geometry`); None when
        `image` is exactly the model's view. The page shows that region only.
    attentions: {layer: (nh, T, T) softmax weights} of one image, T = prefix + Hp*Wp, tokens
        [prefix..., patch_0, ...] with patch k at row k // Wp, column k % Wp.
    layers: the layers whose maps the page offers (default: every layer given); rollout
        uses all the layers given, so pass 0..max(layers) for rollout up to them.
    num_prefix_tokens, prefix_names: tokens before the patches (CLS, registers) and their
        names (default "CLS" then "reg 1", "reg 2", ...).
    predictions: (label, probability) pairs shown under the title.
    methods: any of "attention" and "rollout".
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the explorer page a file name (.html)")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"unknown explorer method(s) {unknown}: use {', '.join(METHODS)}")
    if colormap not in colormap_names():
        raise InputError(f"unknown colormap {colormap!r}: use one of {', '.join(colormap_names())}")
    if not attentions:
        raise ValueError("write_explorer needs the attention of at least one layer")
    arrays = {int(layer): _as_numpy(weights) for layer, weights in attentions.items()}
    layers = sorted(set(int(layer) for layer in (arrays if layers is None else layers)))
    missing = [layer for layer in layers if layer not in arrays]
    if missing:
        raise ValueError(f"layers {missing} were asked for but their attention was not given")
    grid_h, grid_w = grid_size
    prefix = int(num_prefix_tokens)
    tokens = prefix + grid_h * grid_w
    num_heads = next(iter(arrays.values())).shape[0]
    for layer, weights in arrays.items():
        if weights.shape != (num_heads, tokens, tokens):
            raise ValueError(
                f"layer {layer}: attention of shape {weights.shape}, expected "
                f"({num_heads}, {tokens}, {tokens}) for a {grid_h}x{grid_w} grid plus {prefix} "
                "prefix tokens"
            )
    names = list(prefix_names or [])
    names += ["CLS" if i == 0 else f"reg {i}" for i in range(len(names), prefix)]

    def pack(data: bytes) -> tuple[str, int]:
        packed = zlib.compress(data, 9) if compress else data
        return _b64(packed), len(packed)

    payload: dict[str, int] = {}
    stack = np.stack([arrays[layer] for layer in layers])  # L,nh,T,T
    levels, scales, prefix_weights = quantise_rows(stack, prefix)
    attention_data, payload["attention"] = pack(levels.tobytes())
    parts: dict = {
        "attention": {
            "layers": layers,
            "levels": attention_data,
            "scales": _b64(scales.astype("<f4").tobytes()),
            "prefix": _b64(prefix_weights.astype("<f4").tobytes()),
        }
    }
    if "rollout" in methods:
        rolled = rollout_matrices(arrays, layers)
        if rolled:
            roll_layers = sorted(rolled)
            levels, scales, prefix_weights = quantise_rows(
                np.stack([rolled[layer] for layer in roll_layers]), prefix
            )  # L',T,N
            rollout_data, payload["rollout"] = pack(levels.tobytes())
            parts["rollout"] = {
                "layers": roll_layers,
                "levels": rollout_data,
                "scales": _b64(scales.astype("<f4").tobytes()),
                "prefix": _b64(prefix_weights.astype("<f4").tobytes()),
            }
    view, cropped = _view_image(np.asarray(image), geometry, view_long_side)
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=90)
    payload["image"] = buffer.tell()
    data = {
        "title": title,
        "subtitle": subtitle,
        "predictions": [[str(label), float(score)] for label, score in predictions],
        "grid": [grid_h, grid_w],
        "prefix": prefix,
        "prefixNames": names,
        "numHeads": num_heads,
        "tokens": tokens,
        "patchSize": patch_size,
        "methods": [m for m in METHODS if m in methods and m in parts],
        "compression": "deflate" if compress else "none",
        "image": "data:image/jpeg;base64," + _b64(buffer.getvalue()),
        "view": {"width": view.width, "height": view.height, "cropped": cropped},
        "colormap": colormap,
        "colormaps": {name: _b64(colormap_lut(name).tobytes()) for name in colormap_names()},
        **parts,
    }
    page = fill_template(
        _asset("explorer.html"),
        {
            "/*STYLE*/": _asset("explorer.css"),
            "/*SCRIPT*/": _asset("explorer.js"),
            "{{TITLE}}": _escape(title or "attention explorer"),
            "{{DATA}}": script_json(data),
        },
    )
    encoded = page.encode("utf-8")
    atomic_write_bytes(path, encoded, durable=False)
    return ExplorerFile(path=path, size=len(encoded), payload=payload)


# Inside <script>, "<!--" then "<script" puts the HTML parser in a state where the closing
# </script> no longer closes the element (a file named `<!--<script>.jpg` would swallow the
# page's own script); "</" would close it early. JSON allows \\uXXXX for any character in a
# string, and these characters only ever occur inside strings, so escaping them changes
# nothing the script reads. U+2028/9 end a line in older JavaScript parsers.
_SCRIPT_UNSAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def script_json(data: object) -> str:
    """`data` as JSON that is safe to place inside a <script> element as it is."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda match: _SCRIPT_UNSAFE[match.group()], text)


def fill_template(template: str, values: dict[str, str]) -> str:
    """`template` with each key replaced by its value in ONE pass: a value that contains a
    key (a title `{{DATA}}.jpg`) is never substituted again."""
    pattern = "|".join(re.escape(key) for key in values)
    return re.sub(pattern, lambda match: values[match.group()], template)


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


# -- from a model and an image file --------------------------------------------------------
@torch.inference_mode()
def explore_image(
    bundle,
    image_path: str | Path,
    out_path: str | Path,
    layers: Sequence[int] | None = None,
    *,
    device: str = "auto",
    methods: Sequence[str] = METHODS,
    colormap: str = "viridis",
) -> ExplorerFile:
    """Run `bundle`'s model on one image and write its explorer page to `out_path`.

    layers: the layers to embed (negative from the end); None embeds every layer. Rollout
    is offered up to each embedded layer (all layers are computed for it anyway).
    """
    from ..data.images import open_image
    from ..data.loader import normalize
    from ..runtime import resolve_device

    config = bundle.config
    depth = config.depth
    chosen = list(range(depth)) if layers is None else [int(i) for i in layers]
    for index in chosen:
        if not -depth <= index < depth:
            raise InputError(
                f"layer {index} is out of range: this model has {depth} layers "
                f"(0..{depth - 1}, or -1..-{depth})"
            )
    chosen = sorted({index % depth for index in chosen})
    preprocess = bundle.preprocess
    picture, original_size = open_image(image_path, exif=preprocess.exif, rgb=preprocess.rgb)
    geometry = preprocess.geometry(*original_size)
    pixels = torch.from_numpy(preprocess.pixels(picture))[None]
    target = resolve_device(device)
    model = bundle.model.eval().to(target)
    x = normalize(pixels, preprocess, target)  # 1,C,H,W
    grid_size = (x.shape[-2] // config.patch_size, x.shape[-1] // config.patch_size)
    needed = list(range(max(chosen) + 1)) if "rollout" in methods else chosen
    logits, weights = model.forward_with_attention(x, layers=needed)
    probabilities = logits.float().softmax(dim=-1)[0]
    top = probabilities.topk(min(5, probabilities.numel()))
    labels = list(bundle.labels)
    predictions = [
        (labels[i] if i < len(labels) else str(i), float(p))
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]
    attentions = {layer: weights[layer][0].float().cpu().numpy() for layer in needed}  # nh,T,T
    model_name = bundle.reference or config.name or "model"
    return write_explorer(
        out_path,
        np.asarray(picture),
        geometry,
        attentions,
        layers=chosen,
        grid_size=grid_size,
        num_prefix_tokens=config.num_prefix_tokens,
        patch_size=config.patch_size,
        title=Path(image_path).name,
        subtitle=f"{model_name} · {config.name or 'ViT'} · patch {config.patch_size} · "
        f"grid {grid_size[0]}x{grid_size[1]}",
        predictions=predictions,
        methods=methods,
        colormap=colormap,
    )
