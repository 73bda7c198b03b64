"""Peer for bench/e2e.py: a minimal stand-in for timm's inference.py.

timm's inference.py lives in its repository, not in the timm wheel, so this does what it does
with timm's own pieces: `create_model` (here from a local folder, `local-dir:`),
`resolve_data_config`, `create_loader` over an `ImageDataset` (its default 2 workers, the
prefetcher off on a CPU as inference.py leaves it), model(batch), top-5, one JSON line per
image. Runs under the reference environment (VITCLI_REF_PYTHON) as a whole process.

    python bench/peers/timm_inference.py MODEL_FOLDER IMAGE_FOLDER [--batch-size 32] [--workers 2]
"""

import argparse
import json
import sys

import timm
import torch
from timm.data import ImageDataset, create_loader, resolve_data_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)  # inference.py's default
    args = parser.parse_args()
    model = timm.create_model(f"local-dir:{args.model}", pretrained=True).eval()
    config = resolve_data_config(model=model)
    dataset = ImageDataset(args.images)
    loader = create_loader(
        dataset,
        input_size=config["input_size"],
        batch_size=args.batch_size,
        use_prefetcher=False,
        interpolation=config["interpolation"],
        mean=config["mean"],
        std=config["std"],
        num_workers=args.workers,
        crop_pct=config["crop_pct"],
        crop_mode=config["crop_mode"],
    )
    names = dataset.filenames(basename=True)
    out = sys.stdout
    done = 0
    with torch.inference_mode():
        for batch, _ in loader:
            top = model(batch).softmax(-1).topk(5)
            for values, indices in zip(top.values.tolist(), top.indices.tolist()):
                record = [{"index": i, "score": s} for i, s in zip(indices, values)]
                out.write(json.dumps({"path": names[done], "predictions": record}) + "\n")
                done += 1


if __name__ == "__main__":
    main()
