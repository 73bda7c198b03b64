"""Main-process memory of `vit predict` as the number of images grows, with decoding workers.

Classifies N tiny PNGs (8x8, resized to 224x224, so every batch carries full-size pixels) with
a narrow 224x224 ViT through the predict service, and reads the main process's resident set
size (VmRSS in /proc/self/status) after the first `--checkpoint` images and at the end. Memory
must be flat in the number of images: the script exits 1 when the end is more than 15% above
the checkpoint.

It uses only the long-standing Python API (PredictRun, PredictOptions, save_model,
load_model), so it measures an older checkout too: `PYTHONPATH=/path/to/old/checkout python
bench/memory.py`. The cause of the growth it was written for, and the fix, are in the
docstring of vitcli/data/loader.py; the figures are in docs/predict.md.

    python bench/memory.py                        # 500 -> 5000 images, 1 worker
    python bench/memory.py --images 1000 --checkpoint 200 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def rss_mb() -> float:
    """This process's resident set size in MB, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--checkpoint", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    import torch

    import vitcli
    from vitcli.data.inputs import InputItem
    from vitcli.model import ViT, ViTConfig
    from vitcli.services.predict import PredictOptions, PredictRun
    from vitcli.weights.format import save_model
    from vitcli.weights.resolve import load_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        tile = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        for i in range(args.images):
            tile.save(folder / f"{i:05d}.png")
        config = ViTConfig(
            image_size=224, patch_size=32, num_classes=5, width=32, depth=1, num_heads=2, mlp_dim=64
        )
        torch.manual_seed(0)
        bundle = load_model(
            save_model(ViT(config), folder / "model.safetensors", labels=list("abcde"))
        )
        items = [InputItem(str(folder / f"{i:05d}.png")) for i in range(args.images)]
        options = PredictOptions(batch_size=args.batch_size, workers=args.workers, device="cpu")
        run = PredictRun(bundle, items, options)
        samples: dict[int, float] = {}
        done = 0
        start = time.perf_counter()
        for records in run.records():
            done += len(records)
            if args.checkpoint not in samples and done >= args.checkpoint:
                samples[args.checkpoint] = rss_mb()
        samples[done] = rss_mb()
        seconds = time.perf_counter() - start
        assert run.summary.failed == 0

    first, last = samples[args.checkpoint], samples[done]
    growth = last / first - 1
    result = {
        "images": done,
        "workers": args.workers,
        "vitcli": str(Path(vitcli.__file__).parent),
        "rss_mb": {str(k): round(v, 1) for k, v in samples.items()},
        "growth": round(growth, 3),
        "seconds": round(seconds, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['vitcli']}, {args.workers} worker(s): main-process RSS "
            f"{first:.0f} MB after {args.checkpoint} images, {last:.0f} MB after {done} "
            f"({growth * 100:+.1f}%) in {seconds:.0f} s"
        )
    return 0 if growth <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
