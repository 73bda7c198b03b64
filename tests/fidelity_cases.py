"""Photos and checkpoints for the fidelity tests (tests/test_fidelity.py) and their report
(bench/fidelity.py): large photo-like images of every awkward kind, tiny random checkpoints of
each family saved as their home libraries save them, and the jobs that make the home
libraries (tests/reference/home.py, in the reference venv) process the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from checkpoints import randomise_hf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HOME_SCRIPT = Path(__file__).resolve().parent / "reference" / "home.py"


def reference_python() -> str | None:
    """The reference venv's python: VITCLI_REF_PYTHON, else .venv-ref/bin/python."""
    named = os.environ.get("VITCLI_REF_PYTHON")
    candidate = Path(named) if named else ROOT / ".venv-ref" / "bin" / "python"
    return str(candidate) if candidate.exists() else None


def run_home(jobs: list[dict], folder: Path) -> dict[str, np.ndarray]:
    """The home libraries' outputs for `jobs`, computed in the reference venv."""
    python = reference_python()
    assert python is not None
    spec, out = folder / "jobs.json", folder / "home.npz"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [python, str(HOME_SCRIPT), str(spec), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if done.returncode != 0:
        raise AssertionError(f"reference run failed:\n{done.stderr[-4000:]}")
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


# -- photos ----------------------------------------------------------------------------------
def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 picture: smooth gradients, shapes with edges, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [
            120 + 90 * np.sin(x / (width / 3.1) + seed),
            110 + 80 * np.cos(y / (height / 2.3)),
            100 + 70 * np.sin((x + y) / (width / 4.7)),
        ],
        axis=-1,
    )
    for _ in range(6):  # discs and bars with hard edges: where resize filters differ most
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * width
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        image[mask] = rng.uniform(0, 255, 3)
    image[int(height * 0.4) : int(height * 0.45), :] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


PHOTO_KINDS = (
    "landscape",
    "portrait-odd",
    "wide",
    "small",
    "grey",
    "cmyk",
    "palette",
    "rgba",
    "png16",
    "exif-rotated",
)


def make_photos(folder: Path) -> dict[str, Path]:
    """One file per PHOTO_KINDS entry: 1600x1200 and odd-sized JPEGs, a wide and a small image,
    greyscale, CMYK, palette with transparency, RGBA, 16-bit PNG and an EXIF-rotated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def keep(kind: str, name: str) -> Path:
        paths[kind] = folder / name
        return paths[kind]

    Image.fromarray(_photo(1600, 1200, 1)).save(keep("landscape", "landscape.jpg"), quality=90)
    Image.fromarray(_photo(1201, 1601, 2)).save(keep("portrait-odd", "portrait.jpg"), quality=90)
    Image.fromarray(_photo(1023, 387, 3)).save(keep("wide", "wide.png"))
    Image.fromarray(_photo(45, 37, 4)).save(keep("small", "small.png"))
    Image.fromarray(_photo(800, 601, 5)).convert("L").save(keep("grey", "grey.png"))
    Image.fromarray(_photo(900, 700, 6)).convert("CMYK").save(keep("cmyk", "cmyk.jpg"), quality=92)
    palette = Image.fromarray(_photo(640, 479, 7)).quantize(64)
    palette.info["transparency"] = 3
    palette.save(keep("palette", "palette.png"), transparency=3)
    rgba = Image.fromarray(_photo(513, 700, 8)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 513, dtype=np.uint8), (700, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(keep("rgba", "rgba.png"))
    deep = (_photo(700, 500, 9)[..., 0].astype(np.uint16) * 257) // 3  # 16-bit, under 65535
    Image.fromarray(deep).save(keep("png16", "png16.png"))
    rotated = Image.fromarray(_photo(1280, 960, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    rotated.save(keep("exif-rotated", "exif6.jpg"), quality=90, exif=exif)
    return paths


# -- checkpoints -----------------------------------------------------------------------------
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
HF_CASES = {
    # name: (model kind, image size, processor class, processor settings)
    "vit": ("vit", 32, "ViTImageProcessor", {"size": {"height": 32, "width": 32}}),
    "deit": (
        "deit",
        32,
        "DeiTImageProcessor",
        {"size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32}},
    ),
    "clip": (
        "clip",
        32,
        "CLIPImageProcessor",
        {"size": {"shortest_edge": 35}, "crop_size": {"height": 32, "width": 32}},
    ),
    "clip-margin1": (  # shorter side to 33, crop 32: a one-pixel margin
        "clip",
        32,
        "CLIPImageProcessor",
        {"size": {"shortest_edge": 33}, "crop_size": {"height": 32, "width": 32}},
    ),
    "dinov2-reg": (
        "dinov2-reg",
        32,
        "BitImageProcessor",
        {
            "size": {"shortest_edge": 37},
            "crop_size": {"height": 32, "width": 32},
            "do_center_crop": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
    ),
    "siglip": ("siglip", 32, "SiglipImageProcessor", {"size": {"height": 32, "width": 32}}),
    "vit-nonsquare": (
        "vit",
        (32, 48),
        "DeiTImageProcessor",
        {"size": {"height": 41, "width": 57}, "crop_size": {"height": 32, "width": 48}},
    ),
}


def save_hf_case(name: str, folder: Path) -> Path:
    """A transformers model folder (weights, config.json, preprocessor_config.json)."""
    import transformers as T

    kind, size, processor_class, settings = HF_CASES[name]
    eager = dict(attn_implementation="eager")
    fields = dict(SMALL, image_size=size, **eager)
    if kind == "vit":
        model = T.ViTForImageClassification(
            T.ViTConfig(**fields, intermediate_size=64, num_labels=5)
        )
    elif kind == "deit":
        config = T.DeiTConfig(**fields, intermediate_size=64, num_labels=5)
        model = T.DeiTForImageClassificationWithTeacher(config)
    elif kind == "clip":
        config = T.CLIPVisionConfig(**fields, intermediate_size=64, projection_dim=16)
        model = T.CLIPVisionModelWithProjection(config)
    elif kind == "dinov2-reg":
        config = T.Dinov2WithRegistersConfig(
            **fields, mlp_ratio=2, layer_norm_eps=1e-6, num_register_tokens=2
        )
        model = T.Dinov2WithRegistersModel(config)
    else:
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**fields, intermediate_size=64))
    path = folder / name
    randomise_hf(model).save_pretrained(path)
    spec = {"image_processor_type": processor_class, **settings}
    if "crop_size" in settings:
        spec.setdefault("do_center_crop", True)
    (path / "preprocessor_config.json").write_text(json.dumps(spec))
    return path


TIMM_CASES = {
    "timm-vit": {"input_size": [3, 32, 32], "crop_pct": 0.9, "interpolation": "bicubic",
                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "timm-squash": {"input_size": [3, 32, 48], "crop_pct": 0.875, "crop_mode": "squash",
                    "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225]},
    "timm-keepratio": {"input_size": [3, 32, 48], "crop_pct": 0.95,
                       "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                       "std": [0.5, 0.5, 0.5]},
}  # fmt: skip


def save_timm_case(name: str, folder: Path) -> Path:
    """A timm hub folder: config.json (architecture, model_args, pretrained_cfg) and
    model.safetensors in timm's names (ours are timm's)."""
    from safetensors.torch import save_file

    from vitcli.model import ViT, ViTConfig

    cfg = TIMM_CASES[name]
    size = tuple(cfg["input_size"][1:])
    config = ViTConfig(
        image_size=size, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=128, num_classes=5
    )
    model = randomise_hf(ViT(config))
    path = folder / name
    path.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors"
    )
    (path / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_tiny_patch16_224",
                "num_classes": 5,
                "model_args": {
                    "img_size": list(size),
                    "patch_size": 8,
                    "embed_dim": 32,
                    "depth": 2,
                    "num_heads": 4,
                },
                "pretrained_cfg": cfg,
            }
        )
    )
    return path


OPENCLIP_CFG = {"size": 32, "resize_mode": "shortest", "interpolation": "bicubic"}


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitcli", *args],
        capture_output=True,
        text=True,
        env=env or python_env(),
        timeout=300,
    )
