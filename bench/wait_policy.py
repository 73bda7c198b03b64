"""Does passive OpenMP waiting pay off for `vit predict`? Each policy in its own processes.

OpenMP reads OMP_WAIT_POLICY once, when torch loads, so the two policies cannot share a
process. Each round starts one process per policy (unset = OpenMP's default of spinning a
while before sleeping; PASSIVE = sleep at once, what `vit predict` sets); each process times
our predict service end to end over the same folder of generated 1600x1200 JPEGs and then
our model-only forward over as many images. Rounds alternate the two, and the medians and the
per-round ratio end to end (PASSIVE) / model-only (unset) are reported: the latter compares
`vit predict` against the fastest model-only forward, under either policy.

    python bench/wait_policy.py                  # 6 rounds, 300 images, Ti/16 (~8 min on 2 cores)
    python bench/wait_policy.py --rounds 3 --images 160
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = ("unset", "PASSIVE")


def child(folder: Path, threads: int) -> None:
    """One measurement under the policy this process was started with; prints JSON."""
    import torch

    sys.path.insert(0, str(HERE))
    from predict import forward_rate, ours_end_to_end

    from vitcli.weights.resolve import load_model

    torch.set_num_threads(threads)
    model_path = folder / "ours.safetensors"
    model = load_model(model_path).model.eval()
    count = len(list((folder / "images").glob("*.jpg")))
    end_to_end, _ = ours_end_to_end(model_path, folder / "images", 32, None)
    batch = torch.randn(32, 3, *model.config.image_size)
    model_only = forward_rate(model, batch, count)
    print(json.dumps({"end_to_end": end_to_end, "model_only": model_only}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads)
        return

    sys.path.insert(0, str(HERE))
    from predict import make_images, write_models

    results: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    with tempfile.TemporaryDirectory(prefix="vit-bench-wait-") as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        make_images(folder / "images", args.images, (1600, 1200))
        write_models(folder, args.variant)
        for round_number in range(args.rounds):
            for policy in POLICIES:
                env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
                if policy != "unset":
                    env["OMP_WAIT_POLICY"] = policy
                process = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(folder),
                        "--threads",
                        str(args.threads),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(process.stdout.strip().splitlines()[-1])
                results[policy].append(result)
                print(
                    f"round {round_number + 1} {policy:8s} "
                    f"end to end {result['end_to_end']:6.1f} img/s, "
                    f"model-only {result['model_only']:6.1f} img/s",
                    file=sys.stderr,
                )

    print(
        f"\n{args.variant}, {args.images} JPEGs 1600x1200, {args.threads} threads, "
        f"{args.rounds} rounds (medians)\n"
    )
    print(
        "| OMP_WAIT_POLICY | end to end img/s | model-only img/s "
        "| end to end / model-only, same process |"
    )
    print("|---|---|---|---|")
    for policy in POLICIES:
        rows = results[policy]
        print(
            f"| {policy} | {statistics.median(r['end_to_end'] for r in rows):.1f} | "
            f"{statistics.median(r['model_only'] for r in rows):.1f} | "
            f"{statistics.median(r['end_to_end'] / r['model_only'] for r in rows) * 100:.0f}% |"
        )
    paired = [
        p["end_to_end"] / u["model_only"] for p, u in zip(results["PASSIVE"], results["unset"])
    ]
    gain = [p["end_to_end"] / u["end_to_end"] for p, u in zip(results["PASSIVE"], results["unset"])]
    print(
        "\n- end to end PASSIVE / model-only unset, same round: "
        f"median {statistics.median(paired) * 100:.0f}% "
        f"({', '.join(f'{v * 100:.0f}' for v in paired)})"
    )
    print(
        "- end to end PASSIVE / end to end unset, same round: "
        f"median {statistics.median(gain):.2f}x "
        f"({', '.join(f'{v:.2f}' for v in gain)})"
    )


if __name__ == "__main__":
    main()
