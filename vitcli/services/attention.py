"""Attention maps of a ViT: per-head CLS maps, head means, rollout and DINO mass masks.

Conventions (REFERENCE.md section 4):
- tokens are [CLS, patch_0, ..., patch_{N-1}], patch k at row k // Wp, column k % Wp, with
  (Hp, Wp) = (H // P, W // P) of the actual input; never sqrt(N), never (Wp, Hp);
- a per-head map is the CLS query row over the patch keys, A[b, h, 0, 1:];
- rollout (Abnar & Zuidema 2020, Fig. 6 of the ViT paper): per layer fuse the heads, add the
  identity, renormalise rows (keepdim), R = Ã_L ... Ã_1, map = R[0, 1:].

A model without a CLS token (mean pooling) has no CLS row: its maps fall back to the mean
over all query tokens (A.mean over queries, and R's rows averaged), and meta.json says so.

No typer or rich here: progress goes through a plain callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data.inputs import InputItem
from ..data.loader import image_batches, normalize
from ..data.preprocess import Geometry
from ..errors import InputError
from ..runtime import default_workers, render_threads, resolve_device
from ..weights.format import ModelBundle

HEAD_FUSIONS = ("mean", "max", "min")
QUERY_CLS = "cls"
QUERY_MEAN = "mean"  # fallback for models without a CLS token


# -- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionOptions:
    layers: tuple[int, ...] = (-1,)  # per-head maps for these layers (negative from the end)
    rollout: bool = True
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    threshold: float | None = None  # DINO mass threshold per head, e.g. 0.6

    def __post_init__(self) -> None:
        if self.head_fusion not in HEAD_FUSIONS:
            raise InputError(
                f"unknown head fusion {self.head_fusion!r}: use one of {', '.join(HEAD_FUSIONS)}"
            )
        if not 0.0 <= self.discard_ratio < 1.0:
            raise InputError(f"--discard-ratio must be in [0, 1), got {self.discard_ratio}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise InputError(f"--threshold must be in (0, 1], got {self.threshold}")

    def to_dict(self) -> dict:
        return {
            "rollout": self.rollout,
            "head_fusion": self.head_fusion,
            "discard_ratio": self.discard_ratio,
            "threshold": self.threshold,
        }


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
                raise InputError(
                    f"--layer {part!r}: use a layer index (negative counts from the end) or 'all'"
                ) from None
            if not -depth <= index < depth:
                raise InputError(
                    f"--layer {index} is out of range: this model has {depth} layers (0..{depth - 1}, or -1..-{depth})"
                )
            chosen.add(index % depth)
    if not chosen:
        return (depth - 1,)
    return tuple(sorted(chosen))


# -- the maths (torch, batched) -----------------------------------------------------------
def cls_maps(weights: torch.Tensor, grid_size: tuple[int, int], prefix: int) -> torch.Tensor:
    """(B, nh, T, T) softmax weights -> (B, nh, Hp, Wp) maps of the CLS query over the patches.

    Without a CLS token (prefix 0) the map is the mean attention each patch receives over all
    queries, the documented fallback.
    """
    batch, num_heads, tokens, _ = weights.shape
    grid_h, grid_w = grid_size
    if tokens != prefix + grid_h * grid_w:
        raise ValueError(
            f"{tokens} tokens do not match a {grid_h}x{grid_w} grid plus {prefix} prefix tokens"
        )
    if prefix:
        rows = weights[:, :, 0, prefix:]  # B,nh,N: query = CLS, keys = patches
    else:
        rows = weights.mean(dim=2)  # B,nh,N: mean over queries
    return rows.reshape(batch, num_heads, grid_h, grid_w)  # row-major: patch k at (k // Wp, k % Wp)


def fuse_heads(weights: torch.Tensor, fusion: str) -> torch.Tensor:
    """(B, nh, T, T) -> (B, T, T) by mean, max or min over the heads."""
    if fusion == "mean":
        return weights.mean(dim=1)
    if fusion == "max":
        return weights.amax(dim=1)
    if fusion == "min":
        return weights.amin(dim=1)
    raise ValueError(f"unknown head fusion {fusion!r}")


def discard_lowest(fused: torch.Tensor, ratio: float, prefix: int) -> torch.Tensor:
    """Zero the lowest `ratio` of the patch-key entries of every row of every image.

    Per image and per row (vit-explain did it once over the flattened matrix of the first
    image only); the CLS key column is never dropped.
    """
    num_patches = fused.shape[-1] - prefix
    drop = int(ratio * num_patches)
    if drop <= 0:
        return fused
    patches = fused[..., prefix:]  # B,T,N: keys = patches
    _, lowest = patches.topk(drop, dim=-1, largest=False)
    patches = patches.scatter(-1, lowest, 0.0)
    return torch.cat([fused[..., :prefix], patches], dim=-1)


def rollout_step(fused: torch.Tensor) -> torch.Tensor:
    """Ã = (Ā + I) with rows renormalised to sum 1 (keepdim, so each row is divided by its own sum)."""
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    augmented = fused + eye  # residual connection: half the signal skips the attention
    return augmented / augmented.sum(dim=-1, keepdim=True)


def rollout(
    weights: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    prefix: int = 1,
) -> torch.Tensor:
    """Layer-ordered (B, nh, T, T) weights -> R = Ã_L ... Ã_1, (B, T, T)."""
    result = None
    for layer_weights in weights:  # layer 1 first: each new layer multiplies on the left
        step = rollout_step(
            discard_lowest(fuse_heads(layer_weights, head_fusion), discard_ratio, prefix)
        )
        result = step if result is None else step @ result
    if result is None:
        raise ValueError("rollout needs at least one layer")
    return result


def rollout_rows(
    weights: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    prefix: int = 1,
) -> torch.Tensor:
    """The row of R = Ã_L ... Ã_1 the map needs, (B, T), without forming R.

    e_0^T R (the CLS row; the mean row 1^T R / T without CLS) is a chain of vector-matrix
    products taken from the left: O(L T^2) instead of O(L T^3) for the full product.
    """
    steps = [
        rollout_step(discard_lowest(fuse_heads(w, head_fusion), discard_ratio, prefix))
        for w in weights
    ]
    if not steps:
        raise ValueError("rollout needs at least one layer")
    batch, tokens = steps[0].shape[0], steps[0].shape[-1]
    if prefix:
        row = torch.zeros(batch, 1, tokens, dtype=steps[0].dtype, device=steps[0].device)
        row[:, 0, 0] = 1.0  # e_0: the CLS query
    else:
        row = torch.full(
            (batch, 1, tokens), 1.0 / tokens, dtype=steps[0].dtype, device=steps[0].device
        )
    for step in reversed(steps):  # Ã_L first: (e_0^T Ã_L) Ã_{L-1} ...
        row = row @ step  # B,1,T
    return row[:, 0]


def rollout_map(matrix: torch.Tensor, grid_size: tuple[int, int], prefix: int) -> torch.Tensor:
    """(B, T, T) rollout -> (B, Hp, Wp): the CLS row over the patches (mean row without CLS)."""
    batch = matrix.shape[0]
    rows = matrix[:, 0, prefix:] if prefix else matrix.mean(dim=1)  # B,N
    return rows.reshape(batch, grid_size[0], grid_size[1])


def mass_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """DINO: per map keep the largest patches whose cumulative (renormalised) mass reaches t.

    (..., Hp, Wp) -> bool of the same shape.
    """
    flat = maps.flatten(-2)  # ...,N
    values, order = flat.sort(dim=-1)  # ascending
    values = values / values.sum(dim=-1, keepdim=True)
    keep_sorted = values.cumsum(dim=-1) > (1.0 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


# -- per image results --------------------------------------------------------------------
@dataclass
class ImageAttention:
    index: int  # position in the input list
    path: str
    geometry: Geometry
    grid_size: tuple[int, int]  # (Hp, Wp) of the actual input
    layers: list[int]
    heads: np.ndarray  # (layers, nh, Hp, Wp) float32
    head_mean: np.ndarray  # (layers, Hp, Wp) float32
    rollout: np.ndarray | None  # (Hp, Wp) float32
    masks: np.ndarray | None  # (layers, nh, Hp, Wp) uint8, with --threshold
    top: list[tuple[int, str, float]]  # top-5 (class index, label, probability)
    query: str = QUERY_CLS
    display: np.ndarray | None = None  # (h, w, 3) uint8 original for the sheet, from the decoder


def explicit_layers(options: AttentionOptions, depth: int) -> list[int]:
    """The layers that must take the explicit (weights-returning) attention path."""
    if options.rollout:
        return list(range(depth))
    return sorted({index % depth for index in options.layers})


@torch.inference_mode()
def compute_batch(
    model, pixels: torch.Tensor, options: AttentionOptions, labels: Sequence[str]
) -> dict[str, torch.Tensor | list]:
    """One batch through the model -> maps on the CPU. Only `explicit_layers` pay for weights."""
    config = model.config
    depth, prefix, patch = config.depth, config.num_prefix_tokens, config.patch_size
    grid_size = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)  # (Hp, Wp) of this input
    layers = [index % depth for index in options.layers]
    logits, weights = model.forward_with_attention(pixels, explicit_layers(options, depth))
    heads = torch.stack(
        [cls_maps(weights[index], grid_size, prefix) for index in layers], dim=1
    )  # B,L,nh,Hp,Wp
    out: dict = {"heads": heads.float().cpu(), "head_mean": heads.mean(dim=2).float().cpu()}
    if options.rollout:
        row = rollout_rows(
            [weights[index].float() for index in range(depth)],
            head_fusion=options.head_fusion,
            discard_ratio=options.discard_ratio,
            prefix=prefix,
        )  # B,T: the CLS row of R
        out["rollout"] = row[:, prefix:].reshape(-1, *grid_size).cpu()  # B,Hp,Wp
    if options.threshold is not None:
        out["masks"] = mass_mask(heads.float(), options.threshold).to(torch.uint8).cpu()
    probabilities = logits.float().softmax(dim=-1)
    k = min(5, probabilities.shape[-1])
    scores, indices = probabilities.topk(k, dim=-1)
    out["top"] = [
        [
            (int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), float(s))
            for s, i in zip(row_s, row_i)
        ]
        for row_s, row_i in zip(scores.cpu(), indices.cpu())
    ]
    out["grid_size"] = grid_size
    return out


def attention_batches(
    bundle: ModelBundle,
    paths: Sequence[str],
    options: AttentionOptions,
    batch_size: int = 16,
    workers: int | None = None,
    device: str = "auto",
    errors: Sequence[str | None] | None = None,
    display_long_side: int | None = None,
) -> Iterator[tuple[list[ImageAttention], list[tuple[int, str]]]]:
    """Yield (results, failures) per batch, in input order; positions index `paths`.

    `errors[i]`, when not None, is reported as the failure of position i without reading it.
    `display_long_side`: each result also carries its original scaled to that long side.
    """
    model = bundle.model.eval()  # dropout off before any map is taken
    target = resolve_device(device)
    model.to(target)
    depth = model.config.depth
    layers = list(parse_layers(options.layers, depth))  # range-checked, sorted, distinct
    options = replace(options, layers=tuple(layers))
    query = QUERY_CLS if model.config.num_prefix_tokens else QUERY_MEAN
    workers = default_workers() if workers is None else workers
    # Worker start-up is pure cost when there is nothing to overlap with (as predict does).
    workers = max(0, min(workers, math.ceil(len(paths) / batch_size) - 1))
    loader = image_batches(
        paths,
        bundle.preprocess,
        batch_size=batch_size,
        workers=workers,
        pin_memory=target.type == "cuda",
        errors=errors,
        display_long_side=display_long_side,
    )
    for batch in loader:
        results: list[ImageAttention] = []
        if batch.indices:
            maps = compute_batch(
                model, normalize(batch.pixels, bundle.preprocess, target), options, bundle.labels
            )
            for row, (index, geometry) in enumerate(zip(batch.indices, batch.geometries)):
                results.append(
                    ImageAttention(
                        index=index,
                        path=paths[index],
                        geometry=geometry,
                        grid_size=maps["grid_size"],
                        layers=layers,
                        heads=maps["heads"][row].numpy(),
                        head_mean=maps["head_mean"][row].numpy(),
                        rollout=maps["rollout"][row].numpy() if "rollout" in maps else None,
                        masks=maps["masks"][row].numpy() if "masks" in maps else None,
                        top=maps["top"][row],
                        query=query,
                        display=batch.displays[row] if batch.displays is not None else None,
                    )
                )
        yield results, list(batch.failures)


# -- the whole job ------------------------------------------------------------------------
def default_batch_size(config, budget_bytes: int = 1 << 30) -> int:
    """Predict's 32, fewer when the float32 weights of every layer (rollout keeps them all
    until the forward ends) would pass ~1 GiB: B/16 stays at 32, L/16 gets 16."""
    tokens = config.num_prefix_tokens + config.num_patches
    per_image = config.depth * config.num_heads * tokens * tokens * 4
    return max(1, min(32, budget_bytes // per_image))


@dataclass
class RunSummary:
    total: int = 0
    written: list[tuple[str, Path]] = field(default_factory=list)  # (input path, output folder)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input path, error)
    out_dir: Path | None = None
    index_html: Path | None = None
    seconds: float = 0.0


def run_attention(
    bundle: ModelBundle,
    inputs: Sequence[InputItem],
    out_dir: str | Path,
    options: AttentionOptions,
    render_options=None,
    *,
    per_head: bool = False,
    html: bool = False,
    maps_format: str = "safetensors",
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    progress: Callable[[int], None] | None = None,
    on_failure: Callable[[str, str], None] | None = None,
    render_workers: int | None = None,
) -> RunSummary:
    """Compute and write everything for every input; bad files are recorded and skipped.

    `render_workers`: threads that draw and write while the model runs the next batch
    (None: half the CPUs, at most 4; 0: draw inline).
    """
    from . import render

    started = time.perf_counter()
    render_options = render_options or render.RenderOptions()
    if maps_format not in render.MAPS_FORMATS:
        raise InputError(
            f"unknown maps format {maps_format!r}: use one of {', '.join(render.MAPS_FORMATS)}"
        )
    if batch_size is None:
        batch_size = default_batch_size(bundle.config)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise InputError(f"--workers must be 0 or more, got {workers}")
    out_dir = render.prepare_out_dir(out_dir)  # after the option checks: a typo creates nothing
    items = list(inputs)
    names = render.output_names([item.path for item in items])
    summary = RunSummary(total=len(items), out_dir=out_dir)
    entries: list[render.IndexEntry | None] = [None] * len(items)

    def fail(position: int, message: str) -> None:
        summary.failures.append((items[position].path, message))
        entries[position] = render.IndexEntry(
            path=items[position].path, name=names[position], error=message
        )
        if on_failure is not None:
            on_failure(items[position].path, message)

    context = render.RunContext.from_bundle(
        bundle, options, render_options, maps_format=maps_format, per_head=per_head
    )
    batches = (
        attention_batches(
            bundle,
            [item.path for item in items],
            options,
            batch_size=batch_size,
            workers=workers,
            device=device,
            errors=[item.error for item in items],
            # --per-head needs originals larger than a tile and reads the file again anyway.
            display_long_side=None if per_head else render_options.tile,
        )
        if items
        else iter(())
    )
    # Drawing and writing batch k happen in threads while the model runs batch k + 1 (PIL's
    # resize and PNG encoder release the GIL); at most two batches are ever alive.
    pending: list[tuple[ImageAttention, Path, Future]] = []

    def drain() -> None:
        for result, folder, future in pending:
            try:
                entries[result.index] = future.result()
            except render.RenderError as error:
                fail(result.index, str(error))
                continue
            summary.written.append((result.path, folder))
        if progress is not None and pending:
            progress(len(pending))
        pending.clear()

    threads = render_threads() if render_workers is None else render_workers
    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for results, failures in batches:
            for position, message in failures:
                fail(position, message)
            if progress is not None and failures:
                progress(len(failures))
            drain()
            for result in results:
                folder = out_dir / names[result.index]
                if threads:
                    future = pool.submit(render.write_image_outputs, result, folder, context)
                else:  # inline: the same code path, finished before the next batch starts
                    future = Future()
                    try:
                        future.set_result(render.write_image_outputs(result, folder, context))
                    except render.RenderError as error:
                        future.set_exception(error)
                pending.append((result, folder, future))
            if not threads:
                drain()
        drain()
    if html:
        summary.index_html = render.write_index_html(
            out_dir, [entry for entry in entries if entry is not None], context
        )
    summary.seconds = time.perf_counter() - started
    return summary
