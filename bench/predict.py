"""Benchmark `vit predict` against Hugging Face transformers on identical weights.

1. End to end: a folder of generated photo-like 1600x1200 JPEGs classified by our predict
   service (the code path behind `vit predict`, writing JSON lines) and by transformers'
   image-classification pipeline (batch 1, its default, and batch 32).
2. Model only: forward throughput at batch 32, 224x224, of our ViT and of transformers'
   ViTForImageClassification (sdpa attention).

Both use the same random Ti/16 weights (ours saved with save_model, the HF folder written
from the same tensors with timm -> HF names, checked to give the same logits) and the same
torch thread count. Runs are interleaved in one process and repeated.

The speed of a shared 2-core machine drifts by +-20% from one minute to the next, so ratios
are taken between runs made back to back: in each repeat our end-to-end run is followed at
once by our model-only forward over the same number of images, and that by transformers'
model-only forward. The headline ratios are the medians of those paired ratios; the best of
each run and best-over-best ratios are printed too.

    python bench/predict.py                   # defaults: Ti/16, 300 images, 2 threads
    python bench/predict.py --images 100 --repeats 1 --variant S/16
"""

from __future__ import annotations

# As `vit predict` does, before torch loads (set OMP_WAIT_POLICY yourself to override; the peers
# run in this process under the same policy; bench/wait_policy.py compares the policies).
from vitcli.runtime import prefer_passive_waiting

prefer_passive_waiting()

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from vitcli.data.inputs import collect_inputs
from vitcli.model import ViT, ViTConfig
from vitcli.runtime import default_workers
from vitcli.services.outputs import JsonLinesWriter
from vitcli.services.predict import PredictOptions, PredictRun
from vitcli.weights.format import save_model
from vitcli.weights.resolve import load_model

# -- data and weights ----------------------------------------------------------------------------


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour fields, a few hard-edged shapes, fine texture: compresses like a photo."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    array = np.asarray(image).astype(np.int16)
    for _ in range(6):  # rectangles of other colours
        x0, y0 = rng.integers(0, width - 100), rng.integers(0, height - 100)
        w, h = rng.integers(50, width // 3), rng.integers(50, height // 3)
        array[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    array += rng.normal(0, 12, (height, width, 1)).astype(np.int16)  # sensor-like grain
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.2)
    )
    return image


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    bases = [photo_like(*size, rng) for _ in range(min(count, 24))]
    for i in range(count):
        # Distinct files (different crop offsets and flips) without generating each from scratch.
        base = bases[i % len(bases)]
        if (i // len(bases)) % 2:
            base = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        base.save(folder / f"img{i:05d}.jpg", quality=90)


HF_NAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def timm_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (timm) tensor names -> the names transformers writes to disk (REFERENCE.md section 2)."""
    out = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "vit.layernorm.weight": state["norm.weight"],
        "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": state["head.weight"],
        "classifier.bias": state["head.bias"],
    }
    depth = 1 + max(int(name.split(".")[1]) for name in state if name.startswith("blocks."))
    for i in range(depth):
        prefix = f"vit.encoder.layer.{i}."
        for ours, theirs in HF_NAMES.items():
            for kind in ("weight", "bias"):
                out[prefix + theirs + "." + kind] = state[f"blocks.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)  # 3D,(D) -> q, k, v
            for name, tensor in zip(("query", "key", "value"), (q, k, v)):
                out[prefix + f"attention.attention.{name}.{kind}"] = tensor
    return {name: tensor.contiguous() for name, tensor in out.items()}


def write_models(folder: Path, variant: str, seed: int = 0) -> tuple[Path, Path]:
    """Our file and an HF folder holding the same random weights."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = ViTConfig.from_variant(variant, num_classes=1000)
    model = ViT(config).eval()
    with torch.no_grad():  # the zero-initialised head would make every prediction a tie
        model.head.weight.normal_(0, 0.5)
    labels = [f"class_{i}" for i in range(config.num_classes)]
    ours = save_model(model, folder / "ours.safetensors", labels=labels, source=f"random {variant}")
    hf = folder / "hf"
    hf.mkdir()
    save_file(timm_to_hf(model.state_dict()), hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["ViTForImageClassification"],
                "model_type": "vit",
                "hidden_size": config.width,
                "num_hidden_layers": config.depth,
                "num_attention_heads": config.num_heads,
                "intermediate_size": config.mlp_dim,
                "hidden_act": "gelu",
                "image_size": config.image_size[0],
                "patch_size": config.patch_size,
                "num_channels": 3,
                "qkv_bias": True,
                "layer_norm_eps": config.ln_eps,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "id2label": {str(i): label for i, label in enumerate(labels)},
                "label2id": {label: i for i, label in enumerate(labels)},
            }
        )
    )
    (hf / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "ViTImageProcessor",
                "do_resize": True,
                "size": {"height": config.image_size[0], "width": config.image_size[1]},
                "resample": 2,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        )
    )
    return ours, hf


# -- timed runs ----------------------------------------------------------------------------------


def ours_end_to_end(
    model_path: Path, folder: Path, batch_size: int, workers: int | None
) -> tuple[float, dict]:
    bundle = load_model(model_path)
    items = collect_inputs([str(folder)])
    options = PredictOptions(
        top_k=5,
        batch_size=batch_size,
        workers=default_workers() if workers is None else workers,
        device="cpu",
    )
    run = PredictRun(bundle, items, options)
    top1 = {}
    start = time.perf_counter()
    with JsonLinesWriter(os.devnull) as writer:
        for records in run.records():
            writer.write(records)
            for record in records:
                top1[Path(record["path"]).name] = record["predictions"][0]["index"]
    seconds = time.perf_counter() - start
    assert run.summary.failed == 0
    return len(items) / seconds, top1


def hf_pipeline(
    hf_dir: Path, folder: Path, batch_size: int, limit: int | None = None
) -> tuple[float, dict]:
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(hf_dir), device="cpu")
    paths = [str(p) for p in sorted(folder.glob("*.jpg"))][:limit]
    top1 = {}
    start = time.perf_counter()
    for path, result in zip(paths, pipe(paths, batch_size=batch_size, top_k=5)):
        top1[Path(path).name] = int(result[0]["label"].removeprefix("class_"))
    seconds = time.perf_counter() - start
    return len(paths) / seconds, top1


def forward_rate(model, batch: torch.Tensor, images: int) -> float:
    """Images per second of forward passes at batch size len(batch) over `images` images."""
    iterations = max(1, -(-images // batch.shape[0]))
    with torch.inference_mode():
        model(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(iterations):
            model(batch)
        return iterations * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", default="1600x1200", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers",
        default="auto",
        help="our decoding workers, comma-separated to compare several [default: vit predict's]",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--forward-images",
        type=int,
        default=None,
        help="images per model-only timing [default: --images, as end to end]",
    )
    parser.add_argument(
        "--batch1-images",
        type=int,
        default=48,
        help="images for the (slow) batch-1 pipeline run; 0 skips it",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    worker_counts = [None if w.strip() == "auto" else int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        start = time.perf_counter()
        make_images(images, args.images, size)
        ours_path, hf_dir = write_models(tmp, args.variant)
        print(
            f"# {args.images} JPEGs {size[0]}x{size[1]} generated in "
            f"{time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )

        from transformers import ViTForImageClassification

        ours = load_model(ours_path).model.eval()
        theirs = ViTForImageClassification.from_pretrained(
            str(hf_dir), attn_implementation="sdpa"
        ).eval()
        batch = torch.randn(args.batch_size, 3, *ours.config.image_size)
        with torch.inference_mode():
            difference = (
                (ours(batch[:4]) - theirs(pixel_values=batch[:4]).logits).abs().max().item()
            )
        assert difference < 1e-3, (
            f"the two models disagree (max |logit diff| {difference:.2e}): weight mapping is wrong"
        )

        results: dict[str, list[float]] = {}

        def record(name: str, value: float) -> None:
            results.setdefault(name, []).append(value)
            print(f"  {name:<32} {value:7.2f} img/s", file=sys.stderr)

        agreement = []
        forward_images = args.forward_images or args.images
        paired: dict[str, list[float]] = {}  # ratios between runs made back to back
        for repeat in range(args.repeats):
            print(f"# repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            end_to_end = {}
            for workers in worker_counts:
                rate, top1_ours = ours_end_to_end(ours_path, images, args.batch_size, workers)
                count = workers if workers is not None else default_workers()
                end_to_end[count] = rate
                record(f"ours end-to-end ({count} workers)", rate)
            ours_forward = forward_rate(ours, batch, forward_images)
            record("ours model-only", ours_forward)
            hf_forward = forward_rate(theirs, batch, forward_images)
            record("hf model-only (sdpa)", hf_forward)
            for workers, rate in end_to_end.items():
                paired.setdefault(f"end to end ({workers} workers) / model-only", []).append(
                    rate / ours_forward
                )
            paired.setdefault("model-only ours / transformers", []).append(
                ours_forward / hf_forward
            )
            rate, top1_hf = hf_pipeline(hf_dir, images, batch_size=args.batch_size)
            record(f"hf pipeline (batch {args.batch_size})", rate)
            paired.setdefault(f"end to end / hf pipeline (batch {args.batch_size})", []).append(
                end_to_end[default_workers() if None in worker_counts else worker_counts[0]] / rate
            )
            agreement.append(statistics.mean(top1_ours[name] == top1_hf[name] for name in top1_hf))
            if args.batch1_images:
                rate, _ = hf_pipeline(hf_dir, images, batch_size=1, limit=args.batch1_images)
                record("hf pipeline (batch 1, default)", rate)

    best = {name: max(values) for name, values in results.items()}
    # The headline is vit predict's default worker count; other counts are shown for comparison.
    headline = f"ours end-to-end ({default_workers()} workers)"
    ours_best = (
        best[headline]
        if headline in best
        else max(v for k, v in best.items() if k.startswith("ours end-to-end"))
    )
    pipeline_best = max(v for k, v in best.items() if k.startswith("hf pipeline"))
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads, {args.variant}, "
        f"{args.images} JPEGs {size[0]}x{size[1]}, batch {args.batch_size}, "
        f"default workers {default_workers()}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; best of {args.repeats}"
    )
    print()
    print("| run | img/s (best) | all runs |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {best[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print()
    print("| ratio of runs made back to back | median | each repeat |")
    print("|---|---|---|")
    for name, values in paired.items():
        print(
            f"| {name} | {statistics.median(values):.2f} | "
            f"{', '.join(f'{v:.2f}' for v in values)} |"
        )
    print()
    print("best over best:")
    print(
        f"- end to end vs the best HF pipeline run: {ours_best / pipeline_best:.2f}x (goal >= 1.6x)"
    )
    print(
        "- end to end vs our own model-only: "
        f"{ours_best / best['ours model-only'] * 100:.0f}% (goal >= 80%)"
    )
    print(
        "- model-only vs transformers: "
        f"{best['ours model-only'] / best['hf model-only (sdpa)']:.2f}x (goal >= 1.0x)"
    )
    print(
        "- top-1 agreement with the pipeline on the same images: "
        f"{statistics.mean(agreement) * 100:.0f}% (ours decodes large JPEGs in draft mode; "
        f"max |logit diff| on identical input {difference:.1e})"
    )


if __name__ == "__main__":
    main()
