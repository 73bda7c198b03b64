"""Whole-process `vit predict` against its peers, each in its own process, runs alternating.

What a user waits for: start-up, model load, decoding, preprocessing, the forward pass and the
output, for a folder of 64 photo-like 1600x1200 JPEGs (quality 90) and for one image.

- `vit predict FOLDER -m hf/` (exact decoding, the default) against transformers'
  `pipeline("image-classification")` (default torchvision backend, batch 32) on the same
  random Ti/16 as a transformers folder (bench/peers/hf_pipeline.py);
- `vit predict FOLDER -m timm/` against a minimal timm inference.py (create_model,
  resolve_data_config, create_loader, 2 workers, batch 32) on the same weights as a timm folder
  (bench/peers/timm_inference.py);
- the same two with `--fast-decode` (JPEG draft decoding), when this vit has the flag;
- `vit predict one.jpg` against `python -c "import torch"`;
- the floor under the folder runs (bench/e2e_floor.py): import torch, load the checkpoint and
  run the forward pass over as many images, on zeros; no pipeline can take less.

The peers run in the reference environment: $VITCLI_REF_PYTHON, else .venv-ref/bin/python,
else /tmp/vref/bin/python (`make ref-env` builds .venv-ref). Every round runs each command
once, in a rotated order; a ratio is taken within a round (back to back), and the headline is
the median of those ratios. `uptime`'s load average is printed beside the result: the CPU is
shared, and only ratios mean anything on it.

    python bench/e2e.py                       # 5 rounds, ~4 min on 2 cores
    python bench/e2e.py --rounds 7 --keep /tmp/e2e   # keep (and reuse) the images and models
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIT = [sys.executable, "-m", "vitcli"]


def reference_python() -> str:
    """The peers' interpreter: $VITCLI_REF_PYTHON, .venv-ref, or /tmp/vref."""
    for candidate in (
        os.environ.get("VITCLI_REF_PYTHON"),
        str(ROOT / ".venv-ref/bin/python"),
        "/tmp/vref/bin/python",
    ):
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit(
        "error: no reference environment; run `make ref-env` or set VITCLI_REF_PYTHON to a "
        "python with torch, torchvision, timm and transformers"
    )


def setup(folder: Path, count: int) -> None:
    """64 JPEGs, one.jpg, and the same random Ti/16 as a transformers and a timm folder."""
    if (folder / "done").exists():
        return
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "bench"))
    from predict import make_images, write_models

    (folder / "images").mkdir(parents=True, exist_ok=True)
    make_images(folder / "images", count, (1600, 1200))
    shutil.copy(folder / "images" / "img00000.jpg", folder / "one.jpg")
    ours, hf = write_models(folder, "Ti/16")
    if (folder / "hf").resolve() != hf.resolve():
        shutil.move(hf, folder / "hf")
    from vitcli.weights.resolve import load_model

    model = load_model(ours).model
    timm = folder / "timm"
    timm.mkdir(exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(timm / "model.safetensors"))
    labels = [f"class_{i}" for i in range(1000)]
    (timm / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_tiny_patch16_224",
                "num_classes": 1000,
                "label_names": labels,
                "pretrained_cfg": {
                    "input_size": [3, 224, 224],
                    "interpolation": "bicubic",
                    "crop_pct": 0.9,
                    "crop_mode": "center",
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                    "num_classes": 1000,
                },
            }
        )
    )
    del torch
    (folder / "done").write_text("")


def has_fast_decode() -> bool:
    help_text = subprocess.run(
        [*VIT, "predict", "--help"], capture_output=True, text=True, env=_env()
    ).stdout
    return "--fast-decode" in help_text


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("COLUMNS", "200")
    return env


def commands(folder: Path, ref: str, fast: bool, count: int) -> dict[str, list[str]]:
    images, bench = str(folder / "images"), ROOT / "bench" / "peers"
    exact = VIT  # full decoding is vit's default
    runs = {
        "vit hf": [*exact, "predict", images, "-m", str(folder / "hf"), "-q"],
        "hf pipeline": [ref, str(bench / "hf_pipeline.py"), str(folder / "hf"), images],
        "vit timm": [*exact, "predict", images, "-m", str(folder / "timm"), "-q"],
        "timm inference": [ref, str(bench / "timm_inference.py"), str(folder / "timm"), images],
        "floor (import, load, forward)": [
            sys.executable,
            str(ROOT / "bench" / "e2e_floor.py"),
            str(folder / "timm"),
            str(count),
        ],
        "vit one.jpg": [*VIT, "predict", str(folder / "one.jpg"), "-q"],
        "import torch": [sys.executable, "-c", "import torch"],
    }
    if fast:
        draft = [*VIT, "predict", images, "-q", "--fast-decode"]
        runs["vit hf --fast-decode"] = [*draft, "-m", str(folder / "hf")]
        runs["vit timm --fast-decode"] = [*draft, "-m", str(folder / "timm")]
    return runs


RATIOS: dict[str, tuple[str, str, float | None]] = {  # name: (ours, peer, goal)
    "exact vs HF pipeline": ("vit hf", "hf pipeline", 0.5),
    "exact vs timm inference": ("vit timm", "timm inference", 0.5),
    "fast-decode vs HF pipeline": ("vit hf --fast-decode", "hf pipeline", 1 / 3),
    "fast-decode vs timm inference": ("vit timm --fast-decode", "timm inference", 1 / 3),
    "one image vs import torch": ("vit one.jpg", "import torch", 1.1),
    # Not goals: how far below the peers any pipeline could go (bench/e2e_floor.py).
    "floor vs HF pipeline": ("floor (import, load, forward)", "hf pipeline", None),
    "floor vs timm inference": ("floor (import, load, forward)", "timm inference", None),
}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr.decode()[-2000:]}")
    return seconds


def load() -> str:
    return os.getloadavg().__repr__()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--keep", type=Path, help="folder for the images and models (reused)")
    parser.add_argument("--only", help="comma-separated run names (default: all)")
    args = parser.parse_args()
    ref = reference_python()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="vit-e2e-"))
    setup(folder, args.images)
    runs = commands(folder, ref, has_fast_decode(), args.images)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        runs = {name: command for name, command in runs.items() if name in wanted}
    for command in runs.values():  # warm the page cache and the bytecode caches
        timed(command)
    times: dict[str, list[float]] = {name: [] for name in runs}
    loads = [os.getloadavg()[0]]
    names = list(runs)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            times[name].append(timed(runs[name]))
        loads.append(os.getloadavg()[0])
        print(
            f"# round {round_ + 1}: "
            + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in names)
            + f"; load {loads[-1]:.1f}",
            file=sys.stderr,
        )
    print(
        f"\n{args.images} JPEGs 1600x1200, Ti/16 random weights, {args.rounds} rounds; "
        f"ours: {sys.executable}; peers: {ref}; load average (1 min) "
        f"{min(loads):.1f}-{max(loads):.1f} during the runs\n"
    )
    print("| run | wall s, median | each round |")
    print("|---|---|---|")
    for name, values in times.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {each} |")
    print("\n| ratio (same round) | median | each round | goal |")
    print("|---|---|---|---|")
    for label, (ours, peer, goal) in RATIOS.items():
        if ours not in times or peer not in times:
            continue
        ratios = [a / b for a, b in zip(times[ours], times[peer])]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        bound = f"<= {goal:.2f}x" if goal is not None else "(bound)"
        print(f"| {label} | **{statistics.median(ratios):.2f}x** | {each} | {bound} |")
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
