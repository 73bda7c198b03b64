"""Images in, maps out: batches decoded in worker processes, each through `compute_batch`.

Two guarantees live here. A path that is not a regular file (a FIFO, socket or device named
like an image) is reported as a failure without ever being opened: opening a FIFO for
reading blocks until a writer comes. And decoding workers die with the process that started
them: on Linux each worker asks the kernel for SIGKILL when its parent goes (PR_SET_PDEATHSIG),
so a `vit attention` killed by SIGKILL or SIGTERM leaves no worker behind (a worker whose
result pipe is full would otherwise wait on it forever).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ...data.images import special_file_error
from ...data.loader import image_batches
from ...data.preprocess import Geometry
from ...explain.batch import compute_batch as batch_maps
from ...explain.forward import Request
from ...explain.registry import METHODS, memory_factor
from ...runtime import resolve_device, resolve_dtype
from ...weights.format import ModelBundle
from ..finite import finite_rows, is_finite, not_finite_message
from .options import AttentionOptions, default_batch_size, parse_layers

QUERY_CLS = "cls"
QUERY_MEAN = "mean"  # fallback for models without a CLS token
_PR_SET_PDEATHSIG = 1


@dataclass
class ImageAttention:
    index: int  # position in the input list
    path: str
    geometry: Geometry
    grid_size: tuple[int, int]  # (Hp, Wp) of the actual input
    layers: list[int]  # of the per-head maps; [] without them (options.heads False)
    heads: np.ndarray | None  # (layers, nh, Hp, Wp) float32; None without per-head maps
    head_mean: np.ndarray | None  # (layers, Hp, Wp) float32
    methods: dict[str, np.ndarray] = field(default_factory=dict)  # map name -> (Hp, Wp) float32
    # map name -> (method, target name or None for a class-agnostic map)
    map_info: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # target name (top1, class3) -> (class index, label, probability) of this image
    targets: dict[str, tuple[int, str, float]] = field(default_factory=dict)
    masks: np.ndarray | None = None  # (layers, nh, Hp, Wp) uint8, with a threshold
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (index, label, p), top-5
    query: str = QUERY_CLS
    display: np.ndarray | None = None  # (h, w, 3) uint8 original for the sheet, from the decoder
    attentions: dict[int, np.ndarray] | None = None  # layer -> (nh, T, T), with --explore
    # The prefix tokens by name (CLS, dist, reg_0, ...), and each per-head map's raw mass on
    # them before the map was renormalised over the patches: (layers, nh, P).
    prefix_names: list[str] = field(default_factory=list)
    head_query: str = QUERY_CLS  # the query row of `heads`: cls, or mean without a CLS token
    prefix_mass: np.ndarray | None = None
    # The other query rows' per-head maps: "dist" (DeiT distilled, same layers), "probe"
    # (SigLIP's MAP head, one "layer" after the last block): name -> {"heads", "head_mean",
    # "prefix_mass", "masks"} as above.
    queries: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rollout_prefix_mass: np.ndarray | None = None  # (P,) the rollout row's prefix share
    # Targets naming a class an earlier target names for this image (top1 and class3 when
    # top-1 is class 3): dropped target -> the target whose maps stand for both.
    merged_targets: dict[str, str] = field(default_factory=dict)

    @property
    def rollout(self) -> np.ndarray | None:
        return self.methods.get("rollout")

    def method_of(self, key: str) -> str:
        return self.map_info.get(key, (key, None))[0]

    def target_of(self, key: str) -> tuple[int, str, float] | None:
        """(index, label, p) of the class a map explains; None for a class-agnostic map."""
        target = self.map_info.get(key, (key, None))[1]
        return None if target is None else self.targets[target]


def merge_duplicate_targets(result: ImageAttention) -> ImageAttention:
    """One map per class: a target that names, for this image, the class of an earlier target
    is dropped with its maps and recorded in `merged_targets` (the sheet then says
    "top1 = class3 = star" over one map instead of drawing it twice)."""
    first: dict[int, str] = {}  # class index -> first target naming it
    merged: dict[str, str] = {}
    for name, (index, _, _) in result.targets.items():
        if index in first:
            merged[name] = first[index]
        else:
            first[index] = name
    if not merged:
        return result
    kept = [key for key, (_, target) in result.map_info.items() if target not in merged]
    return replace(
        result,
        methods={key: grid_map for key, grid_map in result.methods.items() if key in kept},
        map_info={key: result.map_info[key] for key in kept},
        targets={name: value for name, value in result.targets.items() if name not in merged},
        merged_targets=merged,
    )


def family_fields(maps: dict, row: int) -> dict:
    """One image's prefix masses and other query maps, out of `compute_batch`'s batch."""
    return {
        "prefix_names": list(maps.get("prefix_names", [])),
        "head_query": maps.get("head_query", QUERY_CLS),
        "prefix_mass": maps["prefix_mass"][row].numpy() if "prefix_mass" in maps else None,
        "queries": {
            name: {key: array[row].numpy() for key, array in arrays.items()}
            for name, arrays in maps.get("queries", {}).items()
        },
        "rollout_prefix_mass": (
            maps["rollout_prefix_mass"][row].numpy() if "rollout_prefix_mass" in maps else None
        ),
    }


def _as_float32(value: Any) -> Any:
    """Every floating tensor in a nest of dicts, lists and tuples as float32 (numpy has no
    bfloat16)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _as_float32(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_as_float32(item) for item in value)
    return value


def request_of(options: AttentionOptions, depth: int) -> Request:
    """What the explain core computes per batch for these options (layers resolved)."""
    layers = parse_layers(options.layers, depth) if options.heads else ()
    return Request(
        methods=tuple(METHODS[name] for name in options.methods),
        head_layers=tuple(layers),
        head_fusion=options.head_fusion.value,
        discard_ratio=options.discard_ratio,
        explore=options.explore,
    )


def compute_batch(model, pixels, options: AttentionOptions, labels) -> dict:
    """`explain.batch.compute_batch` for one batch of a `vit attention` run."""
    return batch_maps(
        model,
        pixels,
        request_of(options, model.config.depth),
        labels,
        targets=options.targets,
        threshold=options.threshold,
    )


def resolve_batch_size(options: AttentionOptions, config) -> int:
    if options.batch_size == "auto":
        return default_batch_size(config, factor=memory_factor(options.methods))
    return options.batch_size


def attention_batches(
    bundle: ModelBundle,
    paths: Sequence[str],
    options: AttentionOptions,
    *,
    errors: Sequence[str | None] | None = None,
    display_long_side: int | None = None,
) -> Iterator[tuple[list[ImageAttention], list[tuple[int, str]]]]:
    """Yield (results, failures) per batch, in input order; positions index `paths`.

    `errors[i]`, when not None, is reported as the failure of position i without reading it.
    `display_long_side`: each result also carries its original scaled to that long side.
    """
    model = bundle.model.eval()  # dropout off before any map is taken
    target = resolve_device(options.device)
    dtype, _ = resolve_dtype(options.dtype, target)
    model.to(target)
    depth = model.config.depth
    layers = list(parse_layers(options.layers, depth))  # range-checked, sorted, distinct
    options = replace(options, layers=tuple(layers))
    query = QUERY_CLS if model.config.num_prefix_tokens else QUERY_MEAN
    batch_size = resolve_batch_size(options, bundle.config)
    known = list(errors) if errors is not None else [None] * len(paths)
    known = [error or special_file_error(path) for path, error in zip(paths, known)]
    loader = image_batches(
        paths,
        bundle.preprocess,
        batch_size=batch_size,
        workers=options.workers,
        draft=options.fast_decode,
        pin_memory=target.type == "cuda",
        errors=known,
        display_long_side=display_long_side,
        device=target,
    )
    for batch in loader:
        results: list[ImageAttention] = []
        failures = list(batch.failures)
        if batch.indices:
            assert batch.inputs is not None  # normalised once, by the loader, on the device
            # bfloat16: autocast, every map handed on as float32 (numpy has no bfloat16).
            with torch.autocast(target.type, dtype=dtype, enabled=dtype != torch.float32):
                maps = compute_batch(model, batch.inputs, options, bundle.labels)
            maps = _as_float32(maps)
            finite = _finite_rows(maps, len(batch.indices))
            for row, (index, geometry) in enumerate(zip(batch.indices, batch.geometries)):
                if not finite[row]:  # NaN weights: an error record, never a NaN in meta.json
                    message = not_finite_message("the attention or model output", bundle.reference)
                    failures.append((index, f"{paths[index]}: {message}"))
                    continue
                results.append(
                    merge_duplicate_targets(
                        ImageAttention(
                            index=index,
                            path=paths[index],
                            geometry=geometry,
                            grid_size=maps["grid_size"],
                            layers=layers if options.heads else [],
                            heads=maps["heads"][row].numpy() if "heads" in maps else None,
                            head_mean=maps["head_mean"][row].numpy() if "heads" in maps else None,
                            methods={name: m[row].numpy() for name, m in maps["methods"].items()},
                            map_info=dict(maps["map_info"]),
                            targets={key: per[row] for key, per in maps["targets"].items()},
                            attentions=(
                                {i: a[row].numpy() for i, a in maps["attentions"].items()}
                                if "attentions" in maps
                                else None
                            ),
                            masks=maps["masks"][row].numpy() if "masks" in maps else None,
                            top=maps["top"][row],
                            query=maps.get("query", query),
                            **family_fields(maps, row),
                            display=batch.displays[row] if batch.displays is not None else None,
                        )
                    )
                )
        yield results, sorted(failures)


def _finite_rows(maps: dict, count: int) -> list[bool]:
    """Per image of a `compute_batch` result: whether every map, head, attention matrix and
    class probability it carries is finite."""
    finite = [True] * count
    tensors = [*maps["methods"].values()]
    tensors += [maps[key] for key in ("heads", "head_mean") if key in maps]
    tensors += list(maps.get("attentions", {}).values())
    for tensor in tensors:
        finite = [a and b for a, b in zip(finite, finite_rows(tensor))]
    for row in range(count):
        scores = [p for _, _, p in maps["top"][row]]
        scores += [per[row][2] for per in maps["targets"].values()]
        finite[row] = finite[row] and is_finite(np.asarray(scores, dtype=np.float64))
    return finite
