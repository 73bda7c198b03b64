"""Start-up of `vit predict one.jpg`: float32 against `--int8` with its engine cached (warm),
and against `python -c "import torch"`, each a whole process, runs alternating.

The int8 engine (services/ort_engine.py) is found in the cache by a key; the key used to hash
every weight (344 MB for a B/16), now it is the checkpoint's stamp (weights/stamp.py). This
also times both keys in one process.

    python bench/startup.py                 # B/16 random weights, 7 rounds, ~3 min
    python bench/startup.py --variant S/16 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr.decode()[-2000:]}")
    return time.perf_counter() - start


def keys(model_path: Path) -> None:
    """The cache key by stamp and by hashing every weight, in this process."""
    import torch

    from vitcli.services import ort_engine
    from vitcli.weights.resolve import load_model

    bundle = load_model(model_path)
    size = bundle.preprocess.size
    stamped, hashed = [], []
    for _ in range(3):
        start = time.perf_counter()
        ort_engine.cache_key(bundle, size, 17)
        stamped.append(time.perf_counter() - start)
        stamp, bundle.stamp = bundle.stamp, None
        start = time.perf_counter()
        ort_engine.cache_key(bundle, size, 17)
        hashed.append(time.perf_counter() - start)
        bundle.stamp = stamp
    print(
        f"cache key, best of 3: stamp {min(stamped) * 1000:.1f} ms, hashing every weight "
        f"{min(hashed) * 1000:.0f} ms ({torch.get_num_threads()} threads)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import torch

    from vitcli.model import ViT, ViTConfig
    from vitcli.weights.format import save_model

    with tempfile.TemporaryDirectory(prefix="vit-startup-") as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model = ViT(ViTConfig.from_variant(args.variant, num_classes=1000)).eval()
        path = save_model(model, folder / "model.safetensors", source=f"random {args.variant}")
        del model
        from PIL import Image

        Image.new("RGB", (640, 480), (120, 80, 40)).save(folder / "one.jpg")
        env = dict(os.environ, VITCLI_CACHE=str(folder / "cache"))
        vit = [sys.executable, "-m", "vitcli", "predict", str(folder / "one.jpg"), "-q"]
        runs = {
            "fp32": [*vit, "-m", str(path)],
            "int8 (cached)": [*vit, "-m", str(path), "--int8"],
            "import torch": [sys.executable, "-c", "import torch"],
        }
        for command in runs.values():  # builds the int8 graph once; warms the page cache
            timed(command, env)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds):
            names = list(runs)
            names = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in names:
                times[name].append(timed(runs[name], env))
        keys(path)
    ratios = [a / b for a, b in zip(times["int8 (cached)"], times["fp32"])]
    print(
        f"{args.variant} random weights, {args.rounds} rounds, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print("| run | wall s, median | each round |")
    print("|---|---|---|")
    for name, values in times.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {each} |")
    each = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"\nint8 (cached) / fp32, same round: median **{statistics.median(ratios):.2f}x** ({each})"
    )


if __name__ == "__main__":
    main()
