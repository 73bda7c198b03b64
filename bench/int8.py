"""CPU int8 engines side by side, in one process, on the same weights and the same batch.

    python bench/int8.py                       # B/16, batch 32, 3 interleaved rounds
    python bench/int8.py --variant S/16 --batch 8 --rounds 5 --profile

Engines: our fp32 ViT (eager), our int8 (vitcli.model.int8, both engines; and the
onnxruntime engine behind `--int8`, services/ort_engine.py, called through its wrapper so
its overhead counts), torch's `quantize_dynamic` (fbgemm/x86 engine), and plain ONNX Runtime
fp32 and dynamic int8 (per-channel, reduced range) through `vit export`'s graph. Every round
runs each engine once, back to back, so a noisy neighbour slows all of them alike; the report
is the median over rounds of each engine's speed ratio to our fp32 in that round.
Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from vitcli.data.preprocess import Preprocess
from vitcli.model import ViT, ViTConfig
from vitcli.model.int8 import quantize
from vitcli.weights.format import ModelBundle


def build(variant: str) -> ViT:
    torch.manual_seed(0)
    model = ViT(ViTConfig.from_variant(variant, num_classes=1000)).eval()
    nn.init.trunc_normal_(model.head.weight, std=0.02)  # a zero head would make logits moot
    return model


def ort_session(model: ViT, int8: bool, threads: int):
    import tempfile

    import onnxruntime as ort

    from vitcli.services.export import export_onnx

    bundle = ModelBundle(model, [str(i) for i in range(1000)], Preprocess())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.onnx")
        export_onnx(bundle, path, int8=int8, verify=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])

    return run


def ort_engine(model: ViT, preprocess: Preprocess | None = None) -> nn.Module:
    """Our onnxruntime int8 engine, as `--int8` builds it (its cache in a temporary folder),
    for input at `preprocess.size` (default: the model's own image size)."""
    import os
    import tempfile

    from vitcli.services.ort_engine import OrtInt8ViT

    labels = [str(i) for i in range(model.config.num_classes)]
    preprocess = preprocess or Preprocess(size=model.config.image_size)
    bundle = ModelBundle(model, labels, preprocess)
    saved = os.environ.get("VITCLI_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VITCLI_CACHE"] = tmp
        try:
            return OrtInt8ViT.from_bundle(bundle)
        finally:
            if saved is None:
                os.environ.pop("VITCLI_CACHE")
            else:
                os.environ["VITCLI_CACHE"] = saved


def engines(model: ViT, skip: set[str], threads: int) -> dict:
    found = {"fp32": model}
    if "int8" not in skip:  # the default engine: fbgemm on x86
        found["int8"] = quantize(model)
    if "int8-int_mm" not in skip:  # per-token activations through torch._int_mm
        found["int8-int_mm"] = quantize(model, engine="int_mm")
    if "torch-dynamic" not in skip or "torch-dynamic-pc" not in skip:
        import warnings

        from torch.ao import quantization as tq

        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
    if "torch-dynamic" not in skip:  # per-tensor weights, torch's default
        found["torch-dynamic"] = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    if "torch-dynamic-pc" not in skip:  # per-channel weights, as ours and ORT's
        found["torch-dynamic-pc"] = tq.quantize_dynamic(
            model, {nn.Linear: tq.per_channel_dynamic_qconfig}
        )
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime not installed: ORT engines skipped")
        return found
    if "ort-fp32" not in skip:
        found["ort-fp32"] = ort_session(model, int8=False, threads=threads)
    if "ort-int8" not in skip:
        found["ort-int8"] = ort_session(model, int8=True, threads=threads)
    if "int8-ort-engine" not in skip:  # our int8, onnxruntime engine (--int8's default)
        found["int8-ort-engine"] = ort_engine(model)
    return found


def accuracy(folder: Path, batch: int) -> None:
    """The bundled model, fp32 vs each int8 engine, on a held-out shapes set (generated if
    missing): top-1, agreement, logit error; for the torch engines also the last layer's CLS
    attention (the onnxruntime engine returns no attention: `vit attention` runs on torch)."""
    from PIL import Image

    from vitcli.data.loader import prepare
    from vitcli.data.shapes import generate
    from vitcli.weights.resolve import load_model

    bundle = load_model(None)
    if not folder.exists():
        generate(folder, per_class=100, seed=2)
    paths = sorted(p for p in folder.glob("*/*.jpg") if p.parent.name in bundle.labels)
    truth = torch.tensor([bundle.labels.index(p.parent.name) for p in paths])
    fp32 = bundle.model.eval()
    models: dict[str, nn.Module] = {
        "fp32": fp32,
        "fbgemm": quantize(fp32, engine="fbgemm"),
        "int_mm": quantize(fp32, engine="int_mm"),
    }
    try:
        models["onnxruntime"] = ort_engine(fp32, bundle.preprocess)
    except ImportError:
        print("onnxruntime not installed: its engine skipped")
    layer = bundle.config.depth - 1
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    # The onnxruntime engine has no attention output: logits only.
    cls_maps: dict[str, list[torch.Tensor]] = {n: [] for n in models if n != "onnxruntime"}
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            x = torch.stack(
                [
                    prepare(Image.open(p).convert("RGB"), bundle.preprocess)
                    for p in paths[start:][:batch]
                ]
            )
            for name, model in models.items():
                if name not in cls_maps:
                    logits[name].append(model(x))
                    continue
                out, weights = model.forward_with_attention(x, [layer])
                logits[name].append(out)
                cls_maps[name].append(weights[layer][:, :, 0, 1:].mean(1))  # B,N: CLS row
    a = torch.cat(logits["fp32"])
    top1_fp32 = float((a.argmax(1) == truth).float().mean())
    print(f"{len(paths)} images of {folder}; top-1 fp32 {top1_fp32:.4f}")
    print(f"logits up to {float(a.abs().max()):.2f}")
    for name in models:
        if name == "fp32":
            continue
        b = torch.cat(logits[name])
        top1 = float((b.argmax(1) == truth).float().mean())
        agree = float((a.argmax(1) == b.argmax(1)).float().mean())
        error = float((a - b).abs().max())
        print(
            f"--- engine {name}: top-1 int8 {top1:.4f}  agreement {agree:.4f}"
            f"  max |logit diff| {error:.4f}"
        )
        if name not in cls_maps:
            continue
        ma, mb = torch.cat(cls_maps["fp32"]), torch.cat(cls_maps[name])
        map_error = (ma - mb).abs().amax(1) / ma.amax(1)  # per image, relative to the map's peak
        same_peak = float((ma.argmax(1) == mb.argmax(1)).float().mean())
        cosine = torch.nn.functional.cosine_similarity(ma, mb, dim=1)
        print(
            f"    last-layer CLS attention (head mean): max diff / peak median "
            f"{map_error.median():.4f} max {map_error.max():.4f}; same argmax patch "
            f"{same_peak:.4f}; cosine min {cosine.min():.5f}"
        )


def end_to_end(folder: Path, variant: str, batch: int, rounds: int) -> None:
    """PredictRun (decoding workers, preprocessing, model, top-k) over 64 large JPEGs."""
    import numpy as np
    from PIL import Image

    from vitcli.data.inputs import InputItem
    from vitcli.services.predict import PredictOptions, PredictRun

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for index in range(64):
        path = folder / f"{index:03d}.jpg"
        if not path.exists():  # smooth noise, 3000x2000: a camera-sized decode
            small = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
            Image.fromarray(small).resize((3000, 2000), Image.BILINEAR).save(path, quality=90)
        items.append(InputItem(str(path)))
    model = build(variant)
    labels = [str(i) for i in range(model.config.num_classes)]
    bundles = {
        "fp32": ModelBundle(model, labels, Preprocess()),
        "int8": ModelBundle(quantize(model), labels, Preprocess()),
    }
    try:  # the engine `vit predict --int8` picks when onnxruntime is installed
        engine = ort_engine(model, Preprocess())
        bundles["int8-ort-engine"] = ModelBundle(engine, labels, Preprocess())  # type: ignore[arg-type]
    except ImportError:
        print("onnxruntime not installed: its engine skipped")
    seconds: dict[str, list[float]] = {name: [] for name in bundles}
    for _ in range(rounds):
        for name, bundle in bundles.items():
            start = time.perf_counter()
            for _records in PredictRun(bundle, items, PredictOptions(batch_size=batch)).records():
                pass
            seconds[name].append(time.perf_counter() - start)
    print(f"{variant}, 64 JPEGs 3000x2000, batch {batch}: seconds {seconds}")
    for name in bundles:
        if name == "fp32":
            continue
        ratios = [a / b for a, b in zip(seconds["fp32"], seconds[name])]
        print(f"end to end, {name} x fp32: median {statistics.median(ratios):.2f}, rounds {ratios}")


def profile(model: nn.Module, x: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def families(batch: int) -> None:
    """Output error of every int8 engine against our fp32 on two random-weight models: a B/16
    classifier (logits) and a DINOv2-style S/14 with layer scale and 4 registers, headless
    (embeddings). Noise images; max |diff| / max |fp32| and the worst cosine per image."""
    import copy

    torch.manual_seed(0)
    b16 = build("B/16")
    s14_config = ViTConfig.from_variant(
        "S/16", num_classes=0, patch_size=14, layer_scale=1.0, reg_tokens=4
    )
    s14 = ViT(s14_config).eval()
    with (
        torch.no_grad()
    ):  # learned gammas of DINOv2-S are O(0.1-1); init 1e-5 would hide the blocks
        for name, param in s14.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                param.uniform_(0.05, 0.5)
    x = torch.randn(batch, 3, 224, 224)
    for label, model, output in (("B/16 logits", b16, "logits"), ("S/14 reg4 LS", s14, "embed")):
        with torch.no_grad():
            reference = model(x) if output == "logits" else model.embed(x)
            rows = {
                "int8 fbgemm": quantize(copy.deepcopy(model)),
                "int8 int_mm": quantize(copy.deepcopy(model), engine="int_mm"),
                "int8 onnxruntime engine": ort_engine(model),
            }
            for engine, runner in rows.items():
                got = runner(x) if output == "logits" else runner.embed(x)
                error = float((got - reference).abs().max() / reference.abs().max())
                cosine = float(torch.nn.functional.cosine_similarity(got, reference, dim=-1).min())
                print(
                    f"{label:14s} {engine:24s} max|diff|/max {error:.4f}  cosine min {cosine:.5f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="engines to leave out")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--profile", action="store_true", help="op table of fp32 and int8")
    parser.add_argument(
        "--accuracy",
        type=Path,
        metavar="DIR",
        help="instead of speed: the bundled model fp32 vs int8 on the shapes set in DIR "
        "(made with seed 2, 100 per class, if missing)",
    )
    parser.add_argument(
        "--end-to-end",
        type=Path,
        metavar="DIR",
        help="instead of model-only speed: PredictRun fp32 vs int8 over 64 large JPEGs in DIR",
    )
    parser.add_argument(
        "--families",
        action="store_true",
        help="instead of speed: output error of each int8 engine on a random B/16 and a "
        "DINOv2-style S/14 with layer scale and registers",
    )
    args = parser.parse_args()
    if args.families:
        families(batch=min(args.batch, 16))
        return
    if args.end_to_end:
        end_to_end(args.end_to_end, args.variant, batch=args.batch, rounds=args.rounds)
        return
    if args.accuracy:
        accuracy(args.accuracy, batch=args.batch)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = build(args.variant)
    x = torch.randn(
        args.batch, 3, *model.config.image_size, generator=torch.Generator().manual_seed(1)
    )
    runs = engines(model, set(args.skip), threads)
    print(f"{args.variant}, batch {args.batch}, {threads} threads, engines: {', '.join(runs)}")
    with torch.inference_mode():
        reference = model(x)
        for name, run in runs.items():  # warm-up, and the logit error against fp32
            out = run(x)
            agree = float((out.argmax(1) == reference.argmax(1)).float().mean())
            error = float((out - reference).abs().max() / reference.abs().max())
            print(f"  {name:16s} max|dlogit|/max|logit| {error:.4f}  top-1 agreement {agree:.3f}")
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run(x)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    # CPU time (all threads of this process) is the steadier clock on a shared machine; wall
    # time is what a user waits. Both as the median over rounds of the ratio to fp32.
    peer = "ort-int8" if "ort-int8" in runs else "fp32"
    print(
        f"{'engine':16s} {'img/s':>7s} {'x fp32 wall':>12s} {'x fp32 cpu':>11s} "
        f"{'x ' + peer + ' cpu':>15s}  rounds (wall)"
    )
    for name in runs:
        ratios = [base / t for base, t in zip(wall["fp32"], wall[name])]
        cpu_ratio = statistics.median(b / t for b, t in zip(cpu["fp32"], cpu[name]))
        peer_ratio = statistics.median(b / t for b, t in zip(cpu[peer], cpu[name]))
        rate = args.batch / statistics.median(wall[name])
        shown = " ".join(f"{r:.2f}" for r in ratios)
        print(
            f"{name:16s} {rate:7.2f} {statistics.median(ratios):12.2f} {cpu_ratio:11.2f} "
            f"{peer_ratio:15.2f}  {shown}"
        )
    if args.profile:
        for name in ("fp32", "int8"):
            print(f"--- {name}")
            profile(runs[name], x)


if __name__ == "__main__":
    main()
