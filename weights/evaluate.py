"""Held-out results of the bundled model (run by weights/recipe.sh; numbers go in the card).

    python weights/evaluate.py --model weights/vit-shapes-p16.safetensors \
        --reference runs/default-model/out/best.safetensors --data runs/default-model/test \
        --output weights/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from vitcli.data.loader import image_batches
from vitcli.services.attention.localization import evaluate_localization, shapes_dataset
from vitcli.weights.format import atomic_write_bytes
from vitcli.weights.resolve import load_model


def top1_agreement(a, b, paths: list[str]) -> float:
    """Share of images where two models (e.g. fp16-stored and fp32 weights) agree on top-1."""
    same = total = 0
    with torch.inference_mode():
        for batch in image_batches(paths, a.preprocess, batch_size=64, workers=1):
            same += int(
                (a.model(batch.pixels).argmax(-1) == b.model(batch.pixels).argmax(-1)).sum()
            )
            total += len(batch.indices)
    return same / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", help="fp32 weights the --model file was converted from")
    parser.add_argument("--data", required=True, help="a `vit data shapes` folder (held-out seed)")
    parser.add_argument("--output")
    args = parser.parse_args()

    bundle = load_model(args.model)
    images, masks, labels = shapes_dataset(args.data)
    started = time.perf_counter()
    result = evaluate_localization(bundle, images, masks, labels=labels)
    report = {"model": args.model, "data": args.data, **result.to_dict()}
    if args.reference:
        report["fp16_vs_fp32_top1_agreement"] = top1_agreement(
            bundle, load_model(args.reference), images
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        atomic_write_bytes(args.output, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
