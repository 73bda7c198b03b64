"""Peer for bench/e2e.py: transformers' image-classification pipeline over a folder of JPEGs.

Runs under the reference environment (VITCLI_REF_PYTHON), as a whole process, the way a user
would: `pipeline("image-classification", model=FOLDER)` in its default image-processor backend
(torchvision in transformers 5), on the file paths, batch 32, top 5, one JSON line per image.

    python bench/peers/hf_pipeline.py MODEL_FOLDER IMAGE_FOLDER [--batch-size 32]
"""

import argparse
import json
import sys
from pathlib import Path

from transformers import pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix.lower() == ".jpg")
    pipe = pipeline("image-classification", model=args.model, device="cpu")
    out = sys.stdout
    for path, result in zip(paths, pipe(paths, batch_size=args.batch_size, top_k=5)):
        out.write(json.dumps({"path": path, "predictions": result}) + "\n")


if __name__ == "__main__":
    main()
