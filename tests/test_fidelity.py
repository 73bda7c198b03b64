"""From the image file on disk to the output, vitcli equals the home libraries.

Large photo-like images of every awkward kind (1600x1200 and odd sizes, portrait, wide, small,
greyscale, CMYK, palette with transparency, RGBA, 16-bit PNG, EXIF-rotated) go through each
family's checkpoint twice: through the home library's own pipeline (transformers' processors in
both backends, timm's create_transform, DINO's and OpenCLIP's eval transforms; run in the
reference venv by tests/reference/home.py) and through vitcli's loader. The pixels must be the
same to the last grey level, and logits, embeddings and every attention map within 1e-4 of the
output's scale. Without the reference venv (`make ref-env`) these tests skip, unless
VITCLI_REQUIRE_REF=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from fidelity_cases import (
    HF_CASES,
    OPENCLIP_CFG,
    TIMM_CASES,
    cli,
    make_photos,
    reference_python,
    run_home,
    save_hf_case,
    save_timm_case,
)

from vitcli.data.loader import image_batches
from vitcli.weights.recipes import dino_recipe, openclip_recipe
from vitcli.weights.resolve import load_model

TOL = 1e-4
PIXEL_TOL = 1e-5  # one grey level is ~8e-3 after normalisation: any differing pixel shows

if reference_python() is None:
    if os.environ.get("VITCLI_REQUIRE_REF") == "1":
        raise RuntimeError("VITCLI_REQUIRE_REF=1 but no reference venv: run `make ref-env`")
    pytest.skip("no reference venv (make ref-env)", allow_module_level=True)
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Photos, checkpoints and the home libraries' outputs for all of them (one reference run)."""
    root = tmp_path_factory.mktemp("fidelity")
    photos = make_photos(root / "photos")
    images = [str(path) for path in photos.values()]
    jobs: list[dict] = []
    cases: dict[tuple[str, str], int] = {}
    folders = {}
    for name in HF_CASES:
        folders[name] = save_hf_case(name, root)
        for backend in ("torchvision", "pil"):
            cases[(name, backend)] = len(jobs)
            jobs.append(dict(kind="hf", folder=str(folders[name]), backend=backend, images=images))
    for name in TIMM_CASES:
        folders[name] = save_timm_case(name, root)
        cases[(name, "timm")] = len(jobs)
        jobs.append(dict(kind="timm", folder=str(folders[name]), images=images))
    cases[("dino", "torchvision")] = len(jobs)
    jobs.append(dict(kind="transform", recipe="dino", images=images))
    cases[("openclip", "torchvision")] = len(jobs)
    jobs.append(dict(kind="transform", recipe="openclip", cfg=OPENCLIP_CFG, images=images))
    home = run_home(jobs, root)
    return dict(root=root, photos=photos, images=images, cases=cases, folders=folders, home=home)


def _ours(bundle, images):
    """Our normalised inputs, in input order, from the batch loader the commands use."""
    batches = list(image_batches(images, bundle.preprocess, batch_size=4, workers=0))
    assert not any(batch.failures for batch in batches), [b.failures for b in batches]
    return torch.cat([batch.inputs for batch in batches])


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


HF_RUNS = [(name, backend) for name in HF_CASES for backend in ("torchvision", "pil")]


@pytest.mark.parametrize(("name", "backend"), HF_RUNS, ids=[f"{n}-{b}" for n, b in HF_RUNS])
def test_transformers_pipeline(world, monkeypatch, name, backend):
    monkeypatch.setenv("VITCLI_HF_BACKEND", backend)
    bundle = load_model(str(world["folders"][name]))
    job = world["cases"][(name, backend)]
    home = world["home"]
    inputs = _ours(bundle, world["images"])
    model, config = bundle.model.eval(), bundle.config
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(inputs, layers=range(config.depth))
        classifier = config.num_classes and config.head_kind == "classifier"
        outputs = logits if classifier else model.embed(inputs)
    for number, kind in enumerate(world["photos"]):
        key = f"{job}/{number}"
        pixels = home[f"{key}/pixels"]
        assert inputs[number].shape == pixels.shape, kind
        gap = np.abs(inputs[number].numpy() - pixels).max()
        assert gap <= PIXEL_TOL, f"{kind}: pixels differ by {gap}"
        assert _relative(outputs[number].numpy(), home[f"{key}/output"]) <= TOL, kind
        for layer in range(config.depth):
            theirs = home[f"{key}/attn{layer}"]
            ours = attentions[layer][number].numpy()
            assert np.abs(ours - theirs).max() <= TOL, f"{kind}: attention of layer {layer}"


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_create_transform(world, name):
    bundle = load_model(str(world["folders"][name]))
    job = world["cases"][(name, "timm")]
    inputs = _ours(bundle, world["images"])
    with torch.no_grad():
        logits = bundle.model.eval()(inputs)
    for number, kind in enumerate(world["photos"]):
        pixels = world["home"][f"{job}/{number}/pixels"]
        gap = np.abs(inputs[number].numpy() - pixels).max()
        assert gap <= PIXEL_TOL, f"{kind}: pixels differ by {gap}"
        assert _relative(logits[number].numpy(), world["home"][f"{job}/{number}/output"]) <= TOL


@pytest.mark.parametrize("recipe", ["dino", "openclip"])
def test_original_release_transforms(world, recipe):
    if recipe == "dino":
        preprocess = dino_recipe()
    else:
        size = (OPENCLIP_CFG["size"],) * 2
        preprocess = openclip_recipe(OPENCLIP_CFG, {}, size, "open_clip_config.json")

    class Bundle:  # the loader needs only the recipe
        pass

    bundle = Bundle()
    bundle.preprocess = preprocess  # type: ignore[attr-defined]
    inputs = _ours(bundle, world["images"])
    job = world["cases"][(recipe, "torchvision")]
    for number, kind in enumerate(world["photos"]):
        pixels = world["home"][f"{job}/{number}/pixels"]
        gap = np.abs(inputs[number].numpy() - pixels).max()
        assert gap <= PIXEL_TOL, f"{kind}: pixels differ by {gap}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit", "timm-vit"])
def test_cli_predict_logits_equal_the_home_pipeline(world, tmp_path, name):
    """`vit predict --logits` in a real process: every class's logit, every photo."""
    out = tmp_path / "out.jsonl"
    folder = world["folders"][name]
    done = cli("predict", *world["images"], "-m", str(folder), "--logits", "-k", "5", "-o",
               str(out), "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    backend = "timm" if name.startswith("timm") else "torchvision"
    job = world["cases"][(name, backend)]
    for number, line in enumerate(out.read_text().splitlines()):
        record = json.loads(line)
        ours = np.zeros(5, dtype=np.float32)
        for prediction in record["predictions"]:
            ours[prediction["index"]] = prediction["score"]
        assert "decode" not in record  # exact decoding by default
        assert _relative(ours, world["home"][f"{job}/{number}/output"]) <= TOL


@pytest.mark.slow
def test_cli_embed_equals_the_home_pipeline(world, tmp_path):
    out = tmp_path / "emb.npy"
    folder = world["folders"]["dinov2-reg"]
    done = cli("embed", *world["images"], "-m", str(folder), "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    matrix = np.load(out)
    job = world["cases"][("dinov2-reg", "torchvision")]
    for number in range(len(world["images"])):
        assert _relative(matrix[number], world["home"][f"{job}/{number}/output"]) <= TOL
