"""Benchmark `vit attention` against `vit predict` on the same images, in the same run.

Per image time of:
  predict    the predict service (the code path behind `vit predict`), records consumed;
  maps only  the attention forward (every layer on the explicit path for rollout) + maps,
             no drawing or writing;
  attention  the full `vit attention` service: rollout + the last layer's heads, sheet.png,
             maps.safetensors and meta.json written per image (drawing in threads while the
             model runs the next batch, the default);
  inline     the same with drawing done after each batch in the main thread.

Same random weights, preprocessing, thread count and decoding workers; each command at its
CLI default batch size unless --batch-size is given. Runs are interleaved and repeated in one
process and the best of each is reported, because the machine may be shared.

    python bench/attention.py                        # Ti/16, 48 photo-like 1600x1200 JPEGs
    python bench/attention.py --images 96 --repeats 5 --variant S/16
"""

from __future__ import annotations

# As `vit attention` and `vit predict` do, before torch loads (see vitcli/runtime.py).
from vitcli.runtime import prefer_passive_waiting

prefer_passive_waiting()

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# The same generated photo-like JPEGs as the predict benchmark (bench/ is on sys.path when run).
from predict import make_images

from vitcli.data.inputs import collect_inputs
from vitcli.data.preprocess import timm_default
from vitcli.model import ViT, ViTConfig
from vitcli.runtime import default_workers
from vitcli.services.attention import AttentionOptions, attention_batches, run
from vitcli.services.attention.options import default_batch_size
from vitcli.services.predict import PredictOptions, PredictRun
from vitcli.weights.format import load_vitcli_file, save_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", default="1600x1200", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding workers (default: as the commands)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="both commands (default: each command's own)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))

    work = Path(tempfile.mkdtemp(prefix="vitcli-bench-attention-"))
    try:
        images = work / "images"
        images.mkdir()
        make_images(images, args.images, (width, height))
        torch.manual_seed(0)
        model = ViT(ViTConfig.from_variant(args.variant, num_classes=1000)).eval()
        with torch.no_grad():
            model.head.weight.normal_(0, 0.02)  # a non-zero head so top-1 is not a tie
        model_path = save_model(
            model, work / "model.safetensors", preprocess=timm_default(224, 0.9)
        )
        bundle = load_vitcli_file(model_path)
        items = collect_inputs([str(images)])
        workers = default_workers() if args.workers is None else args.workers
        predict_batch = args.batch_size or 32
        attention_batch = args.batch_size or default_batch_size(bundle.config)
        options = AttentionOptions(
            layers=(-1,), batch_size=attention_batch, workers=workers, out=work / "out"
        )

        def run_predict() -> None:
            run = PredictRun(
                bundle, items, PredictOptions(batch_size=predict_batch, workers=workers)
            )
            count = sum(len(records) for records in run.records())
            assert count == len(items) and run.summary.failed == 0

        def run_maps_only() -> None:
            count = 0
            for results, failures in attention_batches(
                bundle, [item.path for item in items], options
            ):
                assert not failures
                count += len(results)
            assert count == len(items)

        def run_full(render_threads: int | None = None) -> None:
            shutil.rmtree(work / "out", ignore_errors=True)
            chosen = options if render_threads is None else replace(options, render_threads=0)
            summary = run(replace(chosen, inputs=(str(images),)), bundle=bundle)
            assert len(summary.written) == len(items), summary.failures

        runs = {
            "predict": run_predict,
            "maps only": run_maps_only,
            "attention": run_full,  # the default: drawing overlapped with the next forward
            "inline": lambda: run_full(render_threads=0),  # drawing after each batch, same thread
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        run_full()  # warm-up: page cache, allocator, fonts
        for _ in range(args.repeats):
            for name, fn in runs.items():  # interleaved, so load changes hit all three alike
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) / len(items))

        best = {name: min(values) for name, values in times.items()}
        median = {name: statistics.median(values) for name, values in times.items()}
        print(
            f"{args.variant}, {args.images} JPEGs {width}x{height}, torch {torch.__version__}, "
            f"{args.threads} threads, {workers} decoding workers, "
            f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
        )
        print(
            f"batch size: predict {predict_batch}, attention {attention_batch}; "
            f"best of {args.repeats} (median)"
        )
        for name in runs:
            print(
                f"  {name:10s} {best[name] * 1e3:7.1f} ms/image ({median[name] * 1e3:.1f})"
                f"  {best[name] / best['predict']:.2f}x predict"
            )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "best_s": best,
                        "median_s": median,
                        "args": vars(args) | {"json": str(args.json)},
                    },
                    indent=2,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
