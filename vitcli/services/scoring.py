"""Which explanation is right? Every method scored on shapes images whose object masks are known.

One file of ~450 lines on purpose: the four scores share one pass over each batch (the maps,
the masks on the grid, the perturbation curves) and only make sense read together.

For each image of a `vit data shapes` folder (one object, or two of different classes with
`--objects 2`) and each object in it, the object's class is the target, and every method's
map for that target is scored:

- pointing game (Zhang et al. 2016, 15 px tolerance, `localization.score_map`): the map's
  peak lies on the target's object; and, on two-object images, on the *other* object (a
  class-specific method must move when the target moves; a class-agnostic one cannot).
- mass: the share of the map on the target's object vs the object's share of the image (a
  ratio of 1 is a map with no idea), and the same for the other object.
- deletion and insertion AUC (Petsiuk et al. 2018, as in Chefer et al.'s perturbation tests):
  patches are replaced by a baseline in order of relevance, most relevant first, in `steps`
  equal steps (0%, 10%, ..., 100% of the patches by default); the curve is the target's softmax
  probability, its AUC the trapezoid mean over the fraction removed. Deletion starts from the
  image and removes (lower is better), insertion starts from the baseline and restores
  (higher is better). Baseline "mean": each image's mean colour; "blur": a Gaussian blur of
  the image (sigma = half a patch). Ties in a map keep raster order.
- ms per map: the method's own time (forward, backward, LRP), not the scoring's.

A "random" row (a seeded uniform map per image) is the control every method must beat.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.loader import image_batches
from ..errors import DatasetError, InputError, OptionError
from ..explain import METHODS, explain
from ..explain.perturbation import perturbation_auc
from ..model.vit import ViT
from ..runtime import BatchOptions, resolve_device
from ..weights.format import ModelBundle
from ..weights.resolve import as_bundle
from .attention.localization import score_map
from .batchrun import ProgressCallback
from .finite import require_finite

SHARED = {f.name for f in fields(BatchOptions)}  # recorded by the run, not in the report

BASELINES = ("mean", "blur")
CONTROL = "random"


@dataclass(frozen=True)
class ScoreOptions(BatchOptions):
    """`vit score`'s options, beside the shared BatchOptions."""

    batch_size: int = field(default=8, kw_only=True)
    workers: int = field(default=0, kw_only=True)
    methods: tuple[str, ...] = tuple(METHODS)
    tolerance: float = 15.0  # pointing game, pixels of the original
    steps: int = 10  # perturbation steps from 0% to 100% of the patches
    baseline: str = "mean"
    control: bool = True  # also score a random map
    layer: int = -1  # raw's layer
    head_fusion: str = "mean"
    discard_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method {unknown[0]!r}: use one of {', '.join(METHODS)}")
        if self.baseline not in BASELINES:
            raise OptionError(f"--baseline {self.baseline!r}: use one of {', '.join(BASELINES)}")
        if not 1 <= self.steps <= 1000:
            raise OptionError(f"--steps must be in 1..1000, got {self.steps}")


@dataclass
class Record:
    """One map scored: an image, one of its objects as the target, one method."""

    image: str
    target: str
    rank: int  # the target's rank among the model's logits (1 = top-1)
    objects: int
    both_top2: bool  # two objects, and their classes are the model's top two
    hit: bool
    mass: float
    share: float
    other_hit: bool | None
    other_mass: float | None
    other_share: float | None
    deletion: float
    insertion: float


@dataclass
class ScoreReport:
    data: str
    model: str
    options: dict
    images: int
    failures: list[str] = field(default_factory=list)
    records: dict[str, list[Record]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # method time, summed
    maps: dict[str, int] = field(default_factory=dict)  # maps computed

    def summary(self) -> dict:
        """Per method: the scores on one-object images, two-object images, and the two-object
        images whose two classes are the model's top 2 (the issue's goal), JSON-ready."""
        out: dict = {}
        for name, records in self.records.items():
            seconds = self.seconds.get(name, 0.0)
            out[name] = {
                "ms_per_map": 1000.0 * seconds / max(self.maps.get(name, 0), 1),
                "one_object": _group([r for r in records if r.objects == 1]),
                "two_objects": _group([r for r in records if r.objects == 2]),
                "two_objects_top2": _group([r for r in records if r.both_top2]),
            }
        return out

    def to_dict(self) -> dict:
        return {
            "data": self.data,
            "model": self.model,
            "options": self.options,
            "images": self.images,
            "failures": self.failures,
            "methods": self.summary(),
        }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _group(records: Sequence[Record]) -> dict:
    if not records:
        return {"maps": 0}
    two = [r for r in records if r.other_hit is not None]
    mass, share = _mean([r.mass for r in records]), _mean([r.share for r in records])
    result = {
        "maps": len(records),
        "pointing": _mean([float(r.hit) for r in records]),
        "pointing_top1_target": _mean([float(r.hit) for r in records if r.rank == 1]),
        "pointing_top2_target": _mean([float(r.hit) for r in records if r.rank == 2]),
        "mass_on_target": mass,
        "target_share": share,
        "target_mass_ratio": mass / share if mass is not None and share else None,
        "deletion_auc": _mean([r.deletion for r in records]),
        "insertion_auc": _mean([r.insertion for r in records]),
    }
    if two:
        other_mass = _mean([r.other_mass or 0.0 for r in two])
        other_share = _mean([r.other_share or 0.0 for r in two])
        result.update(
            pointing_other=_mean([float(bool(r.other_hit)) for r in two]),
            mass_on_other=other_mass,
            other_share=other_share,
            other_mass_ratio=other_mass / other_share
            if other_mass is not None and other_share
            else None,
        )
    return result


# -- data -----------------------------------------------------------------------------------
def shapes_objects(data_dir: str | Path) -> tuple[list[str], list[dict[str, Path]]]:
    """(images, {class: mask} per image) of a `vit data shapes` folder, one or two objects."""
    from ..data.inputs import natural_key
    from ..data.shapes import object_masks

    root = Path(data_dir)
    images = sorted((str(p) for p in root.glob("*/*.jpg")), key=natural_key)
    if not images:
        raise DatasetError(
            f"no images found in {root} (looked for CLASS/*.jpg with masks in .masks/, as "
            f"`vit data shapes` writes them); generate a set with "
            f"`vit data shapes {root} --objects 2`"
        )
    masks = [object_masks(p) for p in images]
    missing = [str(m) for group in masks for m in group.values() if not m.is_file()]
    if missing:
        raise DatasetError(
            f"{root}: {len(missing)} object masks are missing (e.g. {missing[0]}); "
            "regenerate the folder with `vit data shapes`"
        )
    return images, masks


# -- the run --------------------------------------------------------------------------------
def score_explanations(
    model_ref: ModelBundle | str | Path | None,
    data_dir: str | Path,
    options: ScoreOptions | None = None,
    limit: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> ScoreReport:
    """Score every method (and the random control) on every image of a shapes folder."""
    options = options or ScoreOptions()
    device = resolve_device(options.device)  # a bad --device fails before the model loads
    bundle = as_bundle(model_ref)
    model, labels = bundle.model.eval().to(device), list(bundle.labels)
    images, masks = shapes_objects(data_dir)
    if limit is not None:
        images, masks = images[:limit], masks[:limit]
    unknown = sorted({label for group in masks for label in group} - set(labels))
    if unknown:
        raise DatasetError(
            f"{data_dir}: the model does not know the classes {', '.join(unknown)}; "
            "score a model trained on these shapes (the bundled model knows all six)"
        )
    names = list(options.methods) + ([CONTROL] if options.control else [])
    report = ScoreReport(
        data=str(data_dir),
        model=bundle.reference or "default",
        options={
            **{k: v for k, v in asdict(options).items() if k not in SHARED},
            "methods": names,
        },
        images=0,
        records={name: [] for name in names},
        seconds=dict.fromkeys(names, 0.0),
        maps=dict.fromkeys(names, 0),
    )
    loader = image_batches(
        images,
        bundle.preprocess,
        batch_size=options.batch_size,
        workers=options.workers,
        device=device,
    )
    done = 0
    for batch in loader:
        report.failures.extend(message for _, message in batch.failures)
        if not batch.indices:
            continue
        x = batch.inputs  # normalised once, by the loader
        _score_batch(model, labels, x, batch, images, masks, names, options, report)
        report.images += len(batch.indices)
        done += len(batch.indices) + len(batch.failures)
        if on_progress is not None:
            on_progress(done, len(images))
    return report


def _score_batch(model, labels, x, batch, images, masks, names, options, report) -> None:
    groups = [list(masks[i].items()) for i in batch.indices]  # [(label, mask path), ...]
    arrays = [[np.asarray(Image.open(path).convert("L")) > 127 for _, path in g] for g in groups]
    with torch.no_grad():
        logits = model(x)
    require_finite(logits, "the model output", report.model)
    ranks = logits.argsort(dim=1, descending=True).argsort(dim=1) + 1  # B,K: 1 = top-1
    class_ids = [[labels.index(label) for label, _ in g] for g in groups]
    both_top2 = [
        len(ids) == 2 and sorted(int(ranks[row, i]) for i in ids) == [1, 2]
        for row, ids in enumerate(class_ids)
    ]
    agnostic: dict[str, torch.Tensor] = {}  # class-agnostic maps serve every target
    for slot in range(max(len(g) for g in groups)):
        # Images with fewer objects repeat their last one; the repeats are not recorded.
        targets = torch.tensor([ids[min(slot, len(ids) - 1)] for ids in class_ids])
        for name in names:
            if name == CONTROL:
                maps = _control_maps(model, x, batch.indices)
            elif name in agnostic:
                maps = agnostic[name]
            else:
                started = time.perf_counter()
                maps = explain(
                    model,
                    x,
                    name,
                    targets=targets,
                    labels=labels,
                    layer=options.layer,
                    head_fusion=options.head_fusion,
                    discard_ratio=options.discard_ratio,
                ).maps
                report.seconds[name] += time.perf_counter() - started
                report.maps[name] += len(batch.indices)
                if not METHODS[name].class_specific:
                    agnostic[name] = maps
            require_finite(maps, f"the {name} map", report.model)
            deletion, insertion = perturbation_auc(
                model, x, maps, targets, steps=options.steps, baseline=options.baseline
            )
            require_finite(torch.stack([deletion, insertion]), "the model output", report.model)
            for row, index in enumerate(batch.indices):
                if slot >= len(groups[row]):
                    continue
                geometry = batch.geometries[row]
                heat = maps[row].numpy()
                hit, _, _, mass, share = score_map(
                    heat, arrays[row][slot], geometry, options.tolerance
                )
                other: tuple = (None, None, None)
                if len(groups[row]) == 2:
                    other_hit, _, _, other_mass, other_share = score_map(
                        heat, arrays[row][1 - slot], geometry, options.tolerance
                    )
                    other = (bool(other_hit), float(other_mass), float(other_share))
                report.records[name].append(
                    Record(
                        image=images[index],
                        target=groups[row][slot][0],
                        rank=int(ranks[row, targets[row]]),
                        objects=len(groups[row]),
                        both_top2=both_top2[row],
                        hit=bool(hit),
                        mass=float(mass),
                        share=float(share),
                        other_hit=other[0],
                        other_mass=other[1],
                        other_share=other[2],
                        deletion=float(deletion[row]),
                        insertion=float(insertion[row]),
                    )
                )


def _control_maps(model: ViT, x: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """A uniform random map per image, seeded by its position: the chance level."""
    patch = model.config.patch_size
    grid_h, grid_w = x.shape[-2] // patch, x.shape[-1] // patch
    return torch.stack(
        [
            torch.rand(grid_h, grid_w, generator=torch.Generator().manual_seed(1000 + i))
            for i in indices
        ]
    )


# -- the table ------------------------------------------------------------------------------
TABLE_HEADERS = (
    "method",
    "ms/map",
    "point 1-obj",
    "point 2-obj",
    "point other",
    "2-obj t=top1",
    "2-obj t=top2",
    "both top-2: t1 / t2 (images)",
    "mass ratio tgt",
    "mass ratio other",
    "deletion AUC",
    "insertion AUC",
)


def table_rows(summary: dict) -> list[list[str]]:
    """`ScoreReport.summary()` -> rows of TABLE_HEADERS as text ('-' where there is nothing).

    "point 2-obj" counts both targets of every two-object image, "point other" how often the
    peak lands on the other object instead; "2-obj t=top1/t=top2" split the two-object maps by
    the target's rank in the model's logits; "both top-2" keeps the images whose two classes
    are the model's top two (the issue's goal), split by rank, with their number. Mass ratios
    are on two-object images (one-object when there are none); deletion and insertion AUC are
    over every map.
    """

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = []
    for name, scores in summary.items():
        one, two, top2 = scores["one_object"], scores["two_objects"], scores["two_objects_top2"]
        maps = one.get("maps", 0) + two.get("maps", 0)
        auc = {
            key: None
            if not maps
            else (
                (one.get(key) or 0.0) * one.get("maps", 0)
                + (two.get(key) or 0.0) * two.get("maps", 0)
            )
            / maps
            for key in ("deletion_auc", "insertion_auc")
        }
        both = (
            f"{pct(top2.get('pointing_top1_target'))} / {pct(top2.get('pointing_top2_target'))}"
            f" ({top2.get('maps', 0) // 2})"
        )
        rows.append(
            [
                name,
                "-" if name == CONTROL else f"{scores['ms_per_map']:.0f}",
                pct(one.get("pointing")),
                pct(two.get("pointing")),
                pct(two.get("pointing_other")),
                pct(two.get("pointing_top1_target")),
                pct(two.get("pointing_top2_target")),
                both,
                num(two.get("target_mass_ratio") or one.get("target_mass_ratio"), 2),
                num(two.get("other_mass_ratio"), 2),
                num(auc["deletion_auc"]),
                num(auc["insertion_auc"]),
            ]
        )
    return rows


def markdown_table(summary: dict) -> str:
    lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    return "\n".join(lines)
