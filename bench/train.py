"""Benchmark training throughput of `vit train` against a plain transformers training loop.

1. Training step (model + optimizer): images/s of our training step (`train_step` +
   AdamW `step`, the code `vit train` runs: label-smoothed cross-entropy, global-norm
   clipping, decoupled weight decay groups) against the same loop written by hand around
   transformers' ViTForImageClassification (sdpa attention). Same architecture, batch,
   image size, optimizer, loss, clipping and torch thread count; synthetic tensors so that
   only the model and optimizer are timed. Runs are interleaved in one process, round after
   round; the best and median round of each are reported (the machine may be shared).
2. End to end (--e2e N): our full `vit train` pipeline (decode JPEGs, random resized crop,
   flip in DataLoader workers, uint8 batches normalised on the device, train, validate
   nothing) for one epoch on N
   generated 224x224 shapes images, to show what the data pipeline costs on top of step 1.

    python bench/train.py                          # Ti/16 at 224, batch 32, torch's default threads
    python bench/train.py --depth 6 --rounds 5 --e2e 256
    python bench/train.py --image-size 64 --depth 6 --skip-peer --e2e 384 --e2e-rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitcli.model import ViT, ViTConfig
from vitcli.runtime import keep_freed_memory
from vitcli.services.train import make_optimizer, train_step


def hf_model(config: ViTConfig):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf_config = HFConfig(
        hidden_size=config.width,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        image_size=config.image_size[0],
        patch_size=config.patch_size,
        num_labels=config.num_classes,
        layer_norm_eps=config.ln_eps,
        qkv_bias=config.qkv_bias,
        hidden_act="gelu",
        attn_implementation="sdpa",
    )
    return ViTForImageClassification(hf_config)


def time_ours(model, optimizer, pixels, labels, steps: int) -> float:
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        _, norm, _ = train_step(
            model, model, optimizer, pixels, labels, label_smoothing=0.1, grad_clip=1.0
        )
        float(norm)  # the trainer checks finiteness every step; keep the same sync
        optimizer.step()
    return steps * pixels.shape[0] / (time.perf_counter() - start)


def time_hf(model, optimizer, pixels, labels, steps: int) -> float:
    """The loop a transformers user writes: logits from the model, same loss, clip, step."""
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(pixel_values=pixels).logits
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        float(norm)
        optimizer.step()
    return steps * pixels.shape[0] / (time.perf_counter() - start)


def end_to_end(config: ViTConfig, images: int, batch_size: int, workers: int | None) -> dict:
    from vitcli.data.shapes import generate
    from vitcli.services.train import TrainConfig, run

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "shapes"
        per_class = max(1, images // 6)
        generate(data, per_class=per_class, image_size=config.image_size[0], seed=0)
        options = TrainConfig(
            data=str(data),
            out=str(Path(folder) / "run"),
            model=f"Ti/{config.patch_size}",
            image_size=config.image_size[0],
            depth=config.depth,
            width=config.width,
            num_heads=config.num_heads,
            mlp_dim=config.mlp_dim,
            epochs=1,
            batch_size=batch_size,
            workers=workers,
            amp="off",  # float32, as the step timed alone
        )
        result = run(options)
        row = result.history[-1]
        return {"images": row["train_images"], "images_per_s": row["images_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        help="override the variant's depth (smaller = faster bench)",
    )
    parser.add_argument("--width", type=int, default=None, help="override the variant's width")
    parser.add_argument("--heads", type=int, default=None, help="override its number of heads")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's default)"
    )
    parser.add_argument(
        "--e2e",
        type=int,
        default=0,
        metavar="N",
        help="also time `vit train` end to end on N images",
    )
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers for --e2e")
    parser.add_argument("--e2e-rounds", type=int, default=1, help="rounds of --e2e")
    parser.add_argument(
        "--skip-peer", action="store_true", help="no transformers rounds (only --e2e)"
    )
    args = parser.parse_args()

    keep_freed_memory()  # as `vit train` does, for the step alone and end to end alike
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict = {"depth": args.depth} if args.depth else {}
    if args.width:
        overrides.update(width=args.width, mlp_dim=4 * args.width)
    if args.heads:
        overrides["num_heads"] = args.heads
    config = ViTConfig.from_variant(
        args.variant, image_size=args.image_size, num_classes=args.classes, **overrides
    )
    torch.manual_seed(0)
    ours = ViT(config)
    theirs = hf_model(config)
    assert abs(ours.num_parameters() - sum(p.numel() for p in theirs.parameters())) == 0, (
        "sizes differ"
    )
    opt_ours = make_optimizer(ours, lr=1e-4, weight_decay=0.05)
    opt_hf = make_optimizer(theirs, lr=1e-4, weight_decay=0.05)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.classes, (args.batch_size,))

    print(
        f"{args.variant}{' depth ' + str(args.depth) if args.depth else ''}"
        f"{' width ' + str(args.width) if args.width else ''} at "
        f"{args.image_size}, batch {args.batch_size}, "
        f"{ours.num_parameters() / 1e6:.2f}M params, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        flush=True,
    )
    time_ours(ours, opt_ours, pixels, labels, 1)  # warm-up (allocator, kernels)
    time_hf(theirs, opt_hf, pixels, labels, 1)
    rates: dict[str, list[float]] = {"vitcli": [], "transformers": []}
    for round_index in range(0 if args.skip_peer else args.rounds):
        order = [("vitcli", time_ours, ours, opt_ours), ("transformers", time_hf, theirs, opt_hf)]
        if round_index % 2:
            order.reverse()  # alternate who goes first
        for name, timer, model, optimizer in order:
            rates[name].append(timer(model, optimizer, pixels, labels, args.steps))
        print(
            f"  round {round_index + 1}: "
            + ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in rates.items()),
            flush=True,
        )
    if not args.skip_peer:
        best = {k: max(v, default=0.0) for k, v in rates.items()}
        median = {k: statistics.median(v) if v else 0.0 for k, v in rates.items()}
        print(
            f"training step, img/s   best: vitcli {best['vitcli']:.2f}, "
            f"transformers {best['transformers']:.2f} "
            f"(ratio {best['vitcli'] / best['transformers']:.2f})"
        )
        print(
            f"                     median: vitcli {median['vitcli']:.2f}, "
            f"transformers {median['transformers']:.2f} "
            f"(ratio {median['vitcli'] / median['transformers']:.2f})"
        )
    if args.e2e:
        # Does the input pipeline starve the step? Each round: one epoch of `vit train` end to
        # end, then at once our step alone on tensors over as many steps: the ratio of the two
        # in the same round (goal: >= 85%).
        ratios = []
        for round_index in range(args.e2e_rounds):
            result = end_to_end(config, args.e2e, args.batch_size, args.workers)
            steps = max(1, result["images"] // args.batch_size)
            alone = time_ours(ours, opt_ours, pixels, labels, steps)
            ratios.append(result["images_per_s"] / alone)
            print(
                f"  e2e round {round_index + 1}: vit train end to end (decode + augment + train, "
                f"1 epoch, {result['images']} images) {result['images_per_s']:.2f} img/s, "
                f"step alone {alone:.2f} img/s: {ratios[-1] * 100:.0f}%",
                flush=True,
            )
        each = ", ".join(f"{r * 100:.0f}" for r in ratios)
        print(
            "vit train end to end / training step alone: "
            f"median {statistics.median(ratios) * 100:.0f}% ({each}; goal >= 85%)"
        )


if __name__ == "__main__":
    sys.exit(main())
