"""Fidelity report: vitcli against the home libraries on real-sized photos, and what
`--fast-decode` (JPEG draft decoding) costs in accuracy of the numbers.

    .venv/bin/python bench/fidelity.py            # needs the reference venv: make ref-env

Prints two markdown tables:
1. the parity matrix: per family x reference pipeline x image kind, the largest deviation of
   vitcli's output (logits or embedding) from the home pipeline's, relative to the output's
   largest magnitude (and whether the model inputs were identical to the last grey level);
2. draft versus exact: per family, over the JPEG photos, the largest relative deviation of the
   outputs with --fast-decode from the exact outputs, and the lowest cosine similarity.

Uses the checkpoints and photos of tests/fidelity_cases.py (tiny random models of each family,
saved as their home libraries save them).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fidelity_cases import (
    HF_CASES,
    TIMM_CASES,
    make_photos,
    reference_python,
    run_home,
    save_hf_case,
    save_timm_case,
)

from vitcli.data.loader import image_batches
from vitcli.weights.resolve import load_model

JPEGS = ("landscape", "portrait-odd", "cmyk", "exif-rotated")


def outputs(bundle, images: list[str], draft: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, outputs) for `images`: logits for classifiers, else the embedding."""
    batches = list(image_batches(images, bundle.preprocess, batch_size=8, workers=0, draft=draft))
    inputs = torch.cat([batch.inputs for batch in batches])
    model, config = bundle.model.eval(), bundle.config
    with torch.no_grad():
        if config.num_classes and config.head_kind == "classifier":
            result = model(inputs)
        else:
            result = model.embed(inputs)
    return inputs.numpy(), result.numpy()


def relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def main() -> None:
    import os

    root = Path(tempfile.mkdtemp(prefix="vitcli-fidelity-"))
    photos = make_photos(root / "photos")
    kinds, images = list(photos), [str(path) for path in photos.values()]
    folders = {name: save_hf_case(name, root) for name in HF_CASES}
    folders.update({name: save_timm_case(name, root) for name in TIMM_CASES})
    rows = []
    if reference_python() is not None:
        jobs, keys = [], []
        for name in HF_CASES:
            for backend in ("torchvision", "pil"):
                keys.append((name, f"transformers {backend}", backend))
                jobs.append(dict(kind="hf", folder=str(folders[name]), backend=backend,
                                 images=images))  # fmt: skip
        for name in TIMM_CASES:
            keys.append((name, "timm create_transform", None))
            jobs.append(dict(kind="timm", folder=str(folders[name]), images=images))
        home = run_home(jobs, root)
        for job, (name, reference, backend) in enumerate(keys):
            if backend is not None:
                os.environ["VITCLI_HF_BACKEND"] = backend
            inputs, ours = outputs(load_model(str(folders[name])), images)
            os.environ.pop("VITCLI_HF_BACKEND", None)
            cells = []
            for number in range(len(images)):
                same = np.abs(inputs[number] - home[f"{job}/{number}/pixels"]).max() <= 1e-5
                gap = relative(ours[number], home[f"{job}/{number}/output"])
                cells.append(f"{gap:.1e}" + ("" if same else " (pixels differ)"))
            rows.append(f"| {name} | {reference} | " + " | ".join(cells) + " |")
        print("| family | reference | " + " | ".join(kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        print("\n".join(rows))
        print()
    else:
        print("(no reference venv: `make ref-env` for the parity matrix)\n")
    print("| family | largest relative deviation, --fast-decode vs exact | lowest cosine |")
    print("|---|---|---|")
    jpegs = [str(photos[kind]) for kind in JPEGS]
    # The tiny random models read 32-pixel inputs; the bundled model (trained, 224) is the
    # realistic row.
    for name, folder in {"bundled (224)": "bundled", **folders}.items():
        bundle = load_model(str(folder))
        _, exact = outputs(bundle, jpegs)
        _, fast = outputs(bundle, jpegs, draft=True)
        cosine = (exact * fast).sum(1) / (
            np.linalg.norm(exact, axis=1) * np.linalg.norm(fast, axis=1)
        )
        gaps = [relative(f, e) for f, e in zip(fast, exact)]
        print(f"| {name} | {max(gaps):.2%} | {cosine.min():.6f} |")


if __name__ == "__main__":
    main()
