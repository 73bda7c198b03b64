"""Held-out results of the bundled model (run by weights/recipe/recipe.sh; numbers go in the
card). Lives beside the recipe, outside the package: it is not shipped in the wheel.

    python weights/recipe/evaluate.py --model weights/vit-shapes-p16.safetensors \
        --reference runs/default-model/out/best.safetensors --data runs/default-model/test \
        --pairs runs/default-model/pairs-test --output weights/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from vitcli.data.inputs import natural_key
from vitcli.data.shapes import mask_path
from vitcli.errors import DatasetError, VitError
from vitcli.fileio import atomic_write_bytes
from vitcli.runtime import default_workers
from vitcli.services.attention import AttentionOptions, attention_batches
from vitcli.services.attention.localization import score_map
from vitcli.services.evaluate import evaluate
from vitcli.weights.format import ModelBundle
from vitcli.weights.resolve import load_model


@dataclass
class LocalizationResult:
    images: int = 0
    correct: int = 0  # top-1 correct, from the same forward pass
    hits: int = 0  # peak cell centre within `tolerance` pixels of the object
    strict_hits: int = 0  # peak cell centre on the object
    overlap_hits: int = 0  # peak cell overlaps the object
    mass_on_object: list[float] = field(default_factory=list)
    object_share: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        n = max(self.images, 1)
        mass = float(np.mean(self.mass_on_object)) if self.mass_on_object else 0.0
        share = float(np.mean(self.object_share)) if self.object_share else 0.0
        ratios = [m / s for m, s in zip(self.mass_on_object, self.object_share) if s > 0]
        return {
            "images": self.images,
            "top1": self.correct / n,
            "pointing_game": self.hits / n,
            "pointing_game_strict": self.strict_hits / n,
            "pointing_game_overlap": self.overlap_hits / n,
            "mass_on_object": mass,
            "object_share": share,
            "mass_ratio": mass / share if share else 0.0,
            "median_image_mass_ratio": float(np.median(ratios)) if ratios else 0.0,
            "failures": len(self.failures),
        }


def evaluate_localization(
    bundle: ModelBundle,
    image_paths: Sequence[str],
    mask_paths: Sequence[str],
    labels: Sequence[str] | None = None,
    options: AttentionOptions | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LocalizationResult:
    """Score the rollout of every image against its mask; `labels[i]` is image i's true class.

    `options` (default: rollout, mean fusion) shape the maps; `batch_size` and `workers`
    (None: the default for this machine) replace its runtime fields.
    """
    if len(image_paths) != len(mask_paths):
        raise ValueError("one mask per image")
    if not image_paths:
        raise DatasetError("no images to score")
    options = replace(
        options or AttentionOptions(),
        methods=("rollout",),
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
    )
    result = LocalizationResult()
    for results, failures in attention_batches(bundle, list(image_paths), options):
        result.failures.extend(message for _, message in failures)
        for item in results:
            try:
                mask = np.asarray(Image.open(mask_paths[item.index]).convert("L")) > 127
            except OSError as error:
                result.failures.append(f"{mask_paths[item.index]}: cannot read mask ({error})")
                continue
            if mask.shape[::-1] != tuple(item.geometry.original_size):
                result.failures.append(
                    f"{mask_paths[item.index]}: mask size differs from its image"
                )
                continue
            hit, strict, overlap, mass, share = score_map(
                item.methods["rollout"], mask, item.geometry
            )
            result.images += 1
            result.hits += hit
            result.strict_hits += strict
            result.overlap_hits += overlap
            result.mass_on_object.append(mass)
            result.object_share.append(share)
            if labels is not None and item.top and item.top[0][1] == labels[item.index]:
                result.correct += 1
        if progress is not None:
            progress(len(results) + len(failures))
    return result


def shapes_dataset(data_dir: str | Path) -> tuple[list[str], list[str], list[str]]:
    """(images, masks, labels) of a `vit data shapes` folder, in a stable order."""
    root = Path(data_dir)
    images = sorted((str(p) for p in root.glob("*/*.jpg")), key=natural_key)
    if not images:
        raise DatasetError(f"{root}: no images; generate a set with `vit data shapes {root}`")
    masks = [str(mask_path(p)) for p in images]
    missing = [m for m in masks if not Path(m).is_file()]
    if missing:
        raise DatasetError(
            f"{root}: {len(missing)} images have no mask (e.g. {missing[0]}); "
            "regenerate with `vit data shapes`"
        )
    return images, masks, [Path(p).parent.name for p in images]


def top1_agreement(a, b, data: str, workers: int | None) -> float:
    """Share of images where two models (e.g. fp16-stored and fp32 weights) agree on top-1,
    both run by the eval service (the same decoding and normalisation as `vit eval`)."""
    first = evaluate(data, a, workers=workers).predictions
    second = evaluate(data, b, workers=workers).predictions
    pairs = [(x, y) for x, y in zip(first, second) if x >= 0 and y >= 0]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def pair_results(bundle, data: str, workers: int | None) -> dict:
    """On two-object images (`vit data shapes --objects 2`): how often the top-1 class is one
    of the two objects, and how often both are the top two (what class-specific explanations
    need: a model that knows both objects)."""
    import torch

    from vitcli.data.loader import image_batches
    from vitcli.services.scoring import shapes_objects

    images, masks = shapes_objects(data)
    labels = list(bundle.labels)
    wanted = [{labels.index(name) for name in group} for group in masks]
    model = bundle.model.eval()
    top1 = both = seen = 0
    share = 0.0
    with torch.inference_mode():
        for batch in image_batches(images, bundle.preprocess, batch_size=32, workers=workers or 0):
            if batch.inputs is None:
                continue
            probs = model(batch.inputs).float().softmax(dim=-1)  # B,K
            top = probs.topk(2, dim=-1).indices.tolist()
            for row, index in enumerate(batch.indices):
                objects = wanted[index]
                top1 += top[row][0] in objects
                both += set(top[row]) == objects
                share += float(probs[row, sorted(objects)].sum())
                seen += 1
    return {
        "pair_images": seen,
        "pair_top1_is_an_object": top1 / max(seen, 1),
        "pair_both_top2": both / max(seen, 1),
        "pair_probability_on_objects": share / max(seen, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", help="fp32 weights the --model file was converted from")
    parser.add_argument("--data", required=True, help="a `vit data shapes` folder (held-out seed)")
    parser.add_argument("--pairs", help="a `vit data shapes --objects 2` folder (held-out seed)")
    parser.add_argument("--output")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes")
    args = parser.parse_args()

    try:
        bundle = load_model(args.model)
        images, masks, labels = shapes_dataset(args.data)
        started = time.perf_counter()
        result = evaluate_localization(bundle, images, masks, labels=labels, workers=args.workers)
        report = {"model": args.model, "data": args.data, **result.to_dict()}
        if args.pairs:
            report.update({"pairs": args.pairs, **pair_results(bundle, args.pairs, args.workers)})
        if args.reference:
            report["fp16_vs_fp32_top1_agreement"] = top1_agreement(
                bundle, load_model(args.reference), args.data, args.workers
            )
    except VitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        atomic_write_bytes(args.output, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
