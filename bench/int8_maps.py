"""How far `vit attention --int8` maps move from float32: cosine, top patch, peak error.

    python bench/int8_maps.py [IMAGES...] [--model REF] [--engine fbgemm|int_mm]

Runs the attention service's own batches (per-head maps of every layer, their head mean,
rollout) once in float32 and once with the model quantised, and prints per map kind the
worst and median cosine similarity, how often the most attended patch is the same, and the
largest difference as a share of the float32 map's peak. Default: examples/ with the bundled
model. Results in docs/int8.md.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np

from vitcli.model.int8 import quantize
from vitcli.services.attention.batches import attention_batches
from vitcli.services.attention.options import AttentionOptions
from vitcli.weights.resolve import load_model

ROOT = Path(__file__).resolve().parents[1]


def maps_of(bundle, paths: list[str]) -> dict[str, list[np.ndarray]]:
    """kind -> one (..., Hp, Wp) array per image: heads (layers, nh), head_mean, rollout."""
    options = AttentionOptions(
        inputs=tuple(paths), layers=("all",), methods=("rollout",), workers=0, device="cpu"
    )
    kinds: dict[str, list[np.ndarray]] = {"heads": [], "head_mean": [], "rollout": []}
    for results, failures in attention_batches(bundle, paths, options):
        assert not failures, failures
        for result in results:
            kinds["heads"].append(result.heads)
            kinds["head_mean"].append(result.head_mean)
            kinds["rollout"].append(result.methods["rollout"][None])
    return kinds


def compare(ref: np.ndarray, ours: np.ndarray) -> tuple[float, bool, float, float]:
    """(cosine, same top patch, max |diff| / peak, fp32 value of int8's top patch / fp32 peak)
    of one (Hp, Wp) map."""
    a, b = ref.ravel().astype(np.float64), ours.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    top = int(b.argmax())
    return cosine, int(a.argmax()) == top, float(np.abs(a - b).max() / a.max()), a[top] / a.max()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--model", default=None)
    parser.add_argument("--engine", default=None)
    args = parser.parse_args()
    paths = args.images or sorted(
        str(p) for p in (ROOT / "examples").iterdir() if p.suffix in (".jpg", ".png")
    )
    bundle = load_model(args.model)
    int8 = copy.copy(bundle)
    int8.model = quantize(bundle.model, engine=args.engine)
    fp32_maps, int8_maps = maps_of(bundle, paths), maps_of(int8, paths)
    print(f"{len(paths)} images, model {bundle.reference}, engine {args.engine or 'default'}")
    print(
        f"{'map':<10} {'maps':>5} {'cos min':>8} {'cos med':>8} {'same top':>9} "
        f"{'err med':>8} {'err max':>8}"
    )
    for kind in fp32_maps:
        rows = [
            compare(r, o)
            for ref, ours in zip(fp32_maps[kind], int8_maps[kind])
            for r, o in zip(ref.reshape(-1, *ref.shape[-2:]), ours.reshape(-1, *ours.shape[-2:]))
        ]
        cos, top, err, held = (np.array(column) for column in zip(*rows))
        # Where the top patch moved: how close the new one was to the peak in float32.
        moved = f"{held[~top].min():>8.1%}" if (~top).any() else f"{'-':>9}"
        print(
            f"{kind:<10} {len(rows):>5} {cos.min():>8.5f} {np.median(cos):>8.5f} "
            f"{top.mean():>8.1%} {np.median(err):>8.2%} {err.max():>8.2%} {moved}"
        )


if __name__ == "__main__":
    main()
