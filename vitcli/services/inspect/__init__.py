"""`vit inspect`: the paper's Fig. 7 for any checkpoint.

Three panels, each a PNG, plus the numbers behind them (inspect.json and
inspect.safetensors): the principal components of the patch-embedding filters, the cosine
similarity of the position embeddings, and the mean attention distance of every head over a
set of images. The maths lives in `analysis`, the drawing in `figures`; this module picks
the images, runs the model and writes the files. No typer or rich here.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..._version import __version__
from ...data.inputs import collect_inputs, is_within
from ...data.loader import image_batches, normalize
from ...errors import InputError, OptionError, VitError
from ...fileio import mark_output_folder, write_output
from ...runtime import check_batch_size, check_device, resolve_device
from ...text import json_bytes
from ...weights.format import ModelBundle
from ...weights.resolve import as_bundle
from ..batchrun import ProgressCallback
from ..finite import require_finite
from . import analysis, figures

FILES = {
    "components": "filters_pca.png",
    "similarity": "position_similarity.png",
    "distance": "attention_distance.png",
    "json": "inspect.json",
    "arrays": "inspect.safetensors",
}
PAPER_IMAGES = 128  # the paper averaged the attention distance over 128 images
GENERATED_IMAGES = 12
_EXAMPLES = Path(__file__).resolve().parents[3] / "examples"  # in a checkout only

DISTANCE_DEFINITION = (
    "for each patch query q: d(q) = sum_k A[q,k] / sum_k' A[q,k'] * P * ||g_q - g_k||, over "
    "patch keys k only (prefix tokens such as CLS dropped from queries and keys, each row "
    "renormalised over the patch keys), g = (row, column) on the patch grid, P the patch "
    "size, so d is in pixels of the model input; averaged over the queries, then the images"
)


@dataclass
class ImageSet:
    """The images the attention distance is averaged over, and where they came from."""

    source: str  # "folder", "examples" or "generated"
    description: str  # for people: what was used
    paths: list[str] = field(default_factory=list)  # empty for generated images
    generated: list[Image.Image] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths) or len(self.generated)


@dataclass
class InspectSummary:
    out_dir: Path
    files: list[Path]
    images: ImageSet
    used: int  # images that went through the model
    failures: list[tuple[str, str]]  # (path, error) of images that could not be read
    explained_variance_ratio: np.ndarray  # (k,)
    distances: np.ndarray  # (L, nh) pixels
    seconds: float = 0.0


# -- the images ---------------------------------------------------------------------------
def choose_images(
    images: str | Path | None, image_size: int, limit: int, exclude: Path | None = None
) -> ImageSet:
    """`--images` (a folder, file or glob), else the checkout's examples/, else shape images
    made on the spot by the shapes generator (what the bundled model was trained on).

    Images inside `exclude` (the output folder) are left out: a second run into a folder
    among the images must not average over the first run's PNGs.
    """
    if limit < 1:
        raise OptionError(f"--max-images must be at least 1, got {limit}")
    if images is not None:
        items = [
            item
            for item in collect_inputs([str(images)])
            if item.error is None and not (exclude is not None and is_within(item.path, exclude))
        ]
        if not items:
            raise InputError(f"--images {images}: no images found there; pass a folder of images")
        paths = [item.path for item in items][:limit]
        total = len(items)
        shown = f"{len(paths)} of {total}" if total > len(paths) else f"{len(paths)}"
        return ImageSet("folder", f"{shown} images from {images}", paths=paths)
    if _EXAMPLES.is_dir():
        items = [item for item in collect_inputs([str(_EXAMPLES)]) if item.error is None]
        if items:
            paths = [item.path for item in items][:limit]
            return ImageSet("examples", f"the {len(paths)} images in examples/", paths=paths)
    from ...data.shapes import SHAPES, make_sample

    count = min(GENERATED_IMAGES, limit)
    generated = [
        make_sample(seed=2024, class_index=i % len(SHAPES), index=i, image_size=image_size).image
        for i in range(count)
    ]
    return ImageSet(
        "generated", f"{count} generated shape images (no --images given)", generated=generated
    )


def _input_batches(
    images: ImageSet, bundle: ModelBundle, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor | None, list[tuple[int, str]]]]:
    """(B, C, H, W) model inputs on `device`, normalised once, and the failures among them."""
    if images.paths:
        loader = image_batches(
            images.paths, bundle.preprocess, batch_size=batch_size, workers=0, device=device
        )
        for batch in loader:
            yield (batch.inputs if batch.indices else None), list(batch.failures)
        return
    preprocess = bundle.preprocess
    for start in range(0, len(images.generated), batch_size):
        arrays = [
            preprocess.to_uint8(preprocess.resize_image(image))
            for image in images.generated[start : start + batch_size]
        ]
        yield normalize(torch.from_numpy(np.stack(arrays)), preprocess, device), []


@torch.inference_mode()
def attention_distances(
    bundle: ModelBundle,
    images: ImageSet,
    *,
    batch_size: int = 16,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Per image, layer and head, the mean attention distance: ((n, L, nh), failures)."""
    model = bundle.model.eval()
    target = resolve_device(device)
    model.to(target)
    config = model.config
    layers = list(range(config.depth))
    rows: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    done = 0
    for x, failed in _input_batches(images, bundle, batch_size, target):
        failures.extend((images.paths[index], message) for index, message in failed)
        if x is not None:
            grid_size = (x.shape[-2] // config.patch_size, x.shape[-1] // config.patch_size)
            _, weights = model.forward_with_attention(x, layers=layers)
            per_layer = [
                analysis.attention_distance(
                    weights[layer], grid_size, config.patch_size, config.num_prefix_tokens
                )
                for layer in layers
            ]  # each B,nh
            rows.append(torch.stack(per_layer, dim=1).float().cpu().numpy())  # B,L,nh
            done += x.shape[0]
        done += len(failed)
        if on_progress is not None:
            on_progress(done, len(images))
    if not rows:
        raise VitError(
            "none of the images could be read, so there is no attention distance; "
            + (failures[0][1] if failures else "pass --images with a folder of images")
        )
    return np.concatenate(rows), failures


def default_batch_size(config, budget_bytes: int = 1 << 30) -> int:
    """16 images per forward pass, fewer when the float32 attention weights of every layer
    (all kept until the forward ends) would pass ~1 GiB: B/16 at 224 keeps 16, L/16 at 384
    gets 2."""
    tokens = config.num_prefix_tokens + config.num_patches
    per_image = config.depth * config.num_heads * tokens * tokens * 4
    return max(1, min(16, budget_bytes // per_image))


# -- the job ------------------------------------------------------------------------------
def _prepare_out_dir(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a folder; pick another --out")
    try:
        fresh = not out_dir.exists() or next(os.scandir(out_dir), None) is None
        out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:  # a folder of the user's own images is never marked (it would hide them)
            mark_output_folder(out_dir)
    except OSError as error:
        raise InputError(
            f"--out {out_dir}: cannot create the folder ({error.strerror or error}); "
            "pick another --out"
        ) from None
    return out_dir


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def run_inspect(
    model_ref: ModelBundle | str | Path | None,
    out_dir: str | Path,
    images: str | Path | None = None,
    *,
    max_images: int = PAPER_IMAGES,
    batch_size: int | None = None,
    device: str = "auto",
    colormap: str = "viridis",
    on_progress: ProgressCallback | None = None,
) -> InspectSummary:
    """Compute and write the three panels of Fig. 7 and their numbers into `out_dir`."""
    if batch_size is not None:
        check_batch_size(batch_size)  # usage errors before the model loads
    check_device(device)
    bundle = as_bundle(model_ref)
    started = time.perf_counter()
    if batch_size is None:
        batch_size = default_batch_size(bundle.config)
    if colormap not in figures.colormap_names():
        raise InputError(
            f"unknown --colormap {colormap!r}: use one of {', '.join(figures.colormap_names())}"
        )
    config = bundle.config
    image_set = choose_images(
        images, max(config.image_size), max_images, exclude=Path(out_dir).expanduser()
    )
    out = _prepare_out_dir(out_dir)  # after the option checks: a typo creates nothing
    model_name = bundle.reference or config.name or "model"
    describe = (
        f"{model_name} · {config.name or 'ViT'} · patch {config.patch_size} · "
        f"{config.image_size[0]}x{config.image_size[1]} · depth {config.depth} · "
        f"{config.num_heads} heads"
    )

    weight = bundle.model.patch_embed.proj.weight.detach().float().cpu().numpy()  # D,C,P,P
    require_finite(weight, "patch_embed.proj.weight", model_name)
    pca = analysis.filter_components(weight)
    grid_h, grid_w = config.grid_size
    table = analysis.position_table(bundle.model)  # N,D
    require_finite(table, "the position embedding", model_name)
    similarity = analysis.position_similarity(table, config.grid_size)  # Hp,Wp,Hp,Wp
    per_image, failures = attention_distances(
        bundle, image_set, batch_size=batch_size, device=device, on_progress=on_progress
    )
    require_finite(per_image, "the attention weights", model_name)
    distances = per_image.mean(axis=0)  # L,nh
    uniform = analysis.uniform_distance(config.grid_size, config.patch_size)

    covered = float(pca.explained_variance_ratio.sum())
    panels = {
        "components": figures.components_figure(
            pca.components,
            pca.explained_variance_ratio,
            [
                describe,
                f"{weight.shape[0]} filters of {weight.shape[1]}x{weight.shape[2]}x"
                f"{weight.shape[3]}; the first {len(pca.components)} components explain "
                f"{covered:.1%} of their variance; each tile stretched to its own range",
            ],
        ),
        "similarity": figures.similarity_figure(
            similarity,
            [
                describe,
                f"{config.pos_embed} position embedding, {grid_h}x{grid_w} patch grid"
                + (" (a fixed table)" if config.pos_embed == "sincos2d" else "")
                + "; small grid (row, column) = cosine similarity of that patch with every "
                "patch; prefix tokens excluded; values "
                f"{float(similarity.min()):.2f} to {float(similarity.max()):.2f}, colours "
                "{:g} to {:g}".format(*figures.similarity_range(similarity)),
            ],
            colormap=colormap,
        ),
        "distance": figures.distance_figure(
            distances,
            [
                describe,
                f"averaged over {len(per_image)} images ({image_set.description}) and all "
                "patch queries; prefix tokens dropped, rows renormalised over patches; "
                f"dashed: uniform attention ({uniform:.0f} px)",
            ],
            uniform=uniform,
            image_size=config.image_size,
        ),
    }
    written = []
    for key, image in panels.items():
        path = out / FILES[key]
        write_output(path, _png(image), option="--out")
        written.append(path)

    from safetensors.numpy import save

    arrays = {
        "filter_components": pca.components,  # k,C,P,P
        "explained_variance": pca.explained_variance,  # k
        "explained_variance_ratio": pca.explained_variance_ratio,  # k
        "position_similarity": similarity,  # Hp,Wp,Hp,Wp
        "attention_distance": distances.astype(np.float32),  # L,nh
        "attention_distance_per_image": per_image.astype(np.float32),  # n,L,nh
    }
    write_output(
        out / FILES["arrays"],
        save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
        option="--out",
    )
    written.append(out / FILES["arrays"])
    failed_paths = {path for path, _ in failures}
    used_paths = [p for p in image_set.paths if p not in failed_paths]
    report = {
        "vitcli_version": __version__,
        "model": {
            "reference": bundle.reference,
            "format": bundle.source_format,
            "name": config.name,
            "config": config.to_dict(),
        },
        "filters": {
            "what": "PCA of patch_embed.proj.weight reshaped to (D, C*P*P): rows are samples, "
            "centred over the D filters; components are unit vectors, sign fixed so that the "
            "largest absolute entry is positive",
            "explained_variance_ratio": [round(float(v), 6) for v in pca.explained_variance_ratio],
            "shape": list(pca.components.shape),
        },
        "position_similarity": {
            "what": "cosine similarity of the patch rows of the position embedding (prefix "
            "rows excluded); entry [i, j, r, c] compares patch (i, j) with patch (r, c), "
            "rows and columns from 0",
            "pos_embed": config.pos_embed,
            "grid": [grid_h, grid_w],
        },
        "attention_distance": {
            "definition": DISTANCE_DEFINITION,
            "unit": "pixels of the model input",
            "uniform_attention": round(uniform, 4),
            "per_layer_head": [[round(float(v), 4) for v in row] for row in distances],
            "layers_from": 0,
            "images": {
                "source": image_set.source,
                "description": image_set.description,
                "count": int(len(per_image)),
                "paths": used_paths,
                "failed": [{"path": p, "error": e} for p, e in failures],
            },
        },
        "files": {key: name for key, name in FILES.items()},
    }
    write_output(
        out / FILES["json"],
        json_bytes(report),
        option="--out",
    )
    written.append(out / FILES["json"])
    return InspectSummary(
        out_dir=out,
        files=written,
        images=image_set,
        used=len(per_image),
        failures=failures,
        explained_variance_ratio=pca.explained_variance_ratio,
        distances=distances,
        seconds=time.perf_counter() - started,
    )


__all__: Sequence[str] = [
    "DISTANCE_DEFINITION",
    "InspectSummary",
    "attention_distances",
    "choose_images",
    "default_batch_size",
    "run_inspect",
]
