"""The home libraries' own pipelines, from the image file on disk to the output.

Run with the reference venv's python (`make ref-env`: torch + torchvision + timm + transformers
+ open_clip), never imported by the suite: `python home.py JOBS.json OUT.npz`. Each job names a
checkpoint and images; for each image this writes what the home library gives:
- "hf": transformers' pipeline steps (load_image, AutoImageProcessor in the job's backend,
  the model class named in config.json with eager attention): pixels, output, attentions.
- "timm": timm.create_model(arch, pretrained file, model_args), resolve_data_config and
  create_transform on Image.open(path).convert("RGB"), as timm's inference script: pixels,
  output (logits, or the pooled features of a headless model).
- "transform": pixels only, from the original release's eval transform ("dino": DINO's and
  DINOv2's eval_linear.py; "openclip": open_clip.image_transform with the job's cfg).
Keys: "{job}/{image}/pixels", ".../output", ".../attn{layer}".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def hf_job(job: dict, out: dict, index: int) -> None:
    import transformers
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image

    folder = job["folder"]
    config = json.loads(Path(folder, "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    model = model_class.from_pretrained(folder, attn_implementation="eager").eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend=job["backend"])
    assert processor.backend == job["backend"], processor.backend
    for number, path in enumerate(job["images"]):
        image = load_image(path)  # what pipeline() does with a path: EXIF, convert("RGB")
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            result = model(pixel_values=pixels, output_attentions=True)
        for name in ("logits", "image_embeds", "pooler_output"):
            value = getattr(result, name, None)
            if value is not None:
                break
        key = f"{index}/{number}"
        out[f"{key}/pixels"] = pixels[0].numpy()
        out[f"{key}/output"] = value[0].numpy()
        for layer, weights in enumerate(result.attentions or ()):
            out[f"{key}/attn{layer}"] = weights[0].numpy()


def timm_job(job: dict, out: dict, index: int) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    folder = job["folder"]
    config = json.loads(Path(folder, "config.json").read_text())
    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=f"{folder}/model.safetensors",
            num_classes=config["num_classes"],  # else timm re-initialises the head
            **config["pretrained_cfg"],
        ),
        num_classes=config["num_classes"],
        **config.get("model_args", {}),
    ).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    for number, path in enumerate(job["images"]):
        pixels = transform(Image.open(path).convert("RGB"))[None]
        with torch.no_grad():
            output = model(pixels)
        out[f"{index}/{number}/pixels"] = pixels[0].numpy()
        out[f"{index}/{number}/output"] = output[0].numpy()


def transform_job(job: dict, out: dict, index: int) -> None:
    if job["recipe"] == "dino":
        from torchvision import transforms

        transform = transforms.Compose(
            [
                transforms.Resize(256, interpolation=3),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        opened = lambda path: Image.open(path).convert("RGB")  # noqa: E731  ImageFolder's loader
    else:
        import open_clip

        cfg = job["cfg"]
        transform = open_clip.image_transform(
            cfg["size"],
            is_train=False,
            mean=cfg.get("mean"),
            std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"),
            interpolation=cfg.get("interpolation"),
        )
        opened = Image.open  # open_clip converts to RGB inside its transform
    for number, path in enumerate(job["images"]):
        out[f"{index}/{number}/pixels"] = transform(opened(path)).numpy()


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out: dict[str, np.ndarray] = {}
    runners = {"hf": hf_job, "timm": timm_job, "transform": transform_job}
    for index, job in enumerate(jobs):
        runners[job["kind"]](job, out, index)
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
