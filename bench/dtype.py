"""`--dtype bfloat16` against float32 on this CPU: accuracy on the bundled (trained) model and
speed on random ViTs.

Accuracy: the bundled model on a held-out set of generated shapes (data/shapes.generate,
seed 2), float32 against the model cast to bfloat16 as `vit predict/embed/eval --dtype
bfloat16` runs it (weights and activations bf16): top-1 of each, top-1 agreement, the largest
logit deviation (absolute, and relative to the largest float32 logit); and the last layer's
CLS attention map (mean over heads) as `vit attention --dtype bfloat16` computes it (float32
weights under bf16 autocast): Pearson correlation with the float32 map, per image.

Speed: images/s of the forward pass, float32 against bfloat16 (same thread count, runs
interleaved, median of the per-round ratios), for random Ti/16, S/16 and B/16 at 224 and the
bundled model.

    python bench/dtype.py                        # ~3 min on 2 cores
    python bench/dtype.py --speed-only --variants B/16 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitcli.runtime import cpu_has_fast_bf16


def accuracy(folder: Path, per_class: int, batch: int) -> None:
    from PIL import Image

    from vitcli.data.loader import prepare
    from vitcli.data.shapes import generate
    from vitcli.weights.resolve import load_model

    bundle = load_model(None)
    if not folder.exists():
        generate(folder, per_class=per_class, seed=2)
    paths = sorted(p for p in folder.glob("*/*.jpg") if p.parent.name in bundle.labels)
    truth = torch.tensor([bundle.labels.index(p.parent.name) for p in paths])
    fp32 = bundle.model.eval()
    bf16 = load_model(None).model.eval().to(torch.bfloat16)
    layer = bundle.config.depth - 1
    logits: dict[str, list[torch.Tensor]] = {"fp32": [], "bf16": []}
    maps: dict[str, list[torch.Tensor]] = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            x = torch.stack(
                [
                    prepare(Image.open(p).convert("RGB"), bundle.preprocess)
                    for p in paths[start:][:batch]
                ]
            )
            out, weights = fp32.forward_with_attention(x, [layer])
            logits["fp32"].append(out)
            maps["fp32"].append(weights[layer][:, :, 0, 1:].mean(1))  # B,N: CLS row
            logits["bf16"].append(bf16(x.to(torch.bfloat16)).float())  # as predict/embed/eval
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as vit attention
                _, weights = fp32.forward_with_attention(x, [layer])
            maps["bf16"].append(weights[layer][:, :, 0, 1:].float().mean(1))
    a, b = torch.cat(logits["fp32"]), torch.cat(logits["bf16"])
    ma, mb = torch.cat(maps["fp32"]), torch.cat(maps["bf16"])
    ca, cb = ma - ma.mean(1, keepdim=True), mb - mb.mean(1, keepdim=True)
    pearson = (ca * cb).sum(1) / (ca.norm(dim=1) * cb.norm(dim=1))
    deviation = float((a - b).abs().max())
    print(f"bundled model, {len(paths)} held-out shapes ({folder})")
    print("| measure | float32 | bfloat16 |")
    print("|---|---|---|")
    print(
        f"| top-1 | {float((a.argmax(1) == truth).float().mean()):.4f} | "
        f"{float((b.argmax(1) == truth).float().mean()):.4f} |"
    )
    agreement = float((a.argmax(1) == b.argmax(1)).float().mean())
    print(f"| top-1 agreement with float32 | | {agreement:.4f} |")
    print(
        f"| largest logit deviation | | {deviation:.4f} "
        f"({deviation / float(a.abs().max()) * 100:.2f}% of the largest logit, "
        f"{float(a.abs().max()):.2f}) |"
    )
    print(
        f"| last-layer CLS map, Pearson r with float32 | | median {float(pearson.median()):.5f},"
        f" min {float(pearson.min()):.5f} |"
    )


def speed(variants: list[str], batch: int, rounds: int) -> None:
    from vitcli.model import ViT, ViTConfig
    from vitcli.weights.resolve import load_model

    print(
        f"\nforward img/s, batch {batch}, {torch.get_num_threads()} threads, {rounds} rounds "
        f"interleaved; load average {os.getloadavg()[0]:.1f} at the start"
    )
    print("| model | float32 img/s | bfloat16 img/s | bf16 / fp32: median (each round) |")
    print("|---|---|---|---|")
    for variant in variants:
        if variant == "bundled":
            fp32 = load_model(None).model.eval()
        else:
            torch.manual_seed(0)
            fp32 = ViT(ViTConfig.from_variant(variant, num_classes=1000)).eval()
        bf16 = ViT(fp32.config).eval()
        bf16.load_state_dict(fp32.state_dict())
        bf16 = bf16.to(torch.bfloat16)
        x = torch.randn(batch, 3, *fp32.config.image_size)
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        with torch.inference_mode():
            for model, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
                model(x.to(dtype))  # warm-up
            for _ in range(rounds):
                for name, model, dtype in (
                    ("fp32", fp32, torch.float32),
                    ("bf16", bf16, torch.bfloat16),
                ):
                    xi = x.to(dtype)
                    start = time.perf_counter()
                    model(xi)
                    rates[name].append(batch / (time.perf_counter() - start))
        ratios = [b / a for a, b in zip(rates["fp32"], rates["bf16"])]
        print(
            f"| {variant} | {statistics.median(rates['fp32']):.1f} | "
            f"{statistics.median(rates['bf16']):.1f} | **{statistics.median(ratios):.2f}x** "
            f"({', '.join(f'{r:.2f}' for r in ratios)}) |"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=Path, help="held-out set folder (generated if missing)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--variants", default="bundled,Ti/16,S/16,B/16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speed-only", action="store_true")
    args = parser.parse_args()
    if not cpu_has_fast_bf16():
        sys.exit("this CPU has no native bf16: vit refuses --dtype bfloat16 here")
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native bf16 {cpu_has_fast_bf16()}"
    )
    if not args.speed_only:
        with tempfile.TemporaryDirectory() as tmp:
            accuracy(args.shapes or Path(tmp) / "shapes", args.per_class, args.batch)
    speed([v.strip() for v in args.variants.split(",")], args.batch, args.rounds)


if __name__ == "__main__":
    main()
