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

from vitcli.errors import VitError
from vitcli.fileio import atomic_write_bytes
from vitcli.services.attention.localization import evaluate_localization, shapes_dataset
from vitcli.services.evaluate import evaluate
from vitcli.weights.resolve import load_model


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
