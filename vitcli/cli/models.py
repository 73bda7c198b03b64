"""`vit info`, `vit convert` and `vit fetch`: look at, convert and download checkpoints.

No torch at import time: the loaders are imported inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import InputError, OptionError

if TYPE_CHECKING:
    from ..weights.format import ModelBundle

ALL_LABELS_UP_TO = 20  # fewer labels than this are all shown; more: the first SHOWN_LABELS
SHOWN_LABELS = 5


def printable(text: str) -> str:
    """Control characters (ESC, CR, ...) from a checkpoint shown as escapes, never sent raw to
    the terminal, then rich markup escaped."""
    from rich.markup import escape

    return escape(
        "".join(
            char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
            for char in text
        )
    )


def summarize(bundle: ModelBundle) -> dict:
    """Everything `vit info` shows, as plain JSON-able data."""
    from ..model import describe_family

    config = bundle.config
    return {
        "reference": bundle.reference,
        "source_format": bundle.source_format,
        "name": config.name,
        "family": describe_family(config),
        "config": config.to_dict(),
        "num_parameters": sum(p.numel() for p in bundle.model.parameters()),
        "num_labels": len(bundle.labels),
        "labels": list(bundle.labels),
        "preprocess": bundle.preprocess.to_dict(),
        "extra": bundle.extra,
    }


def _render_info(info: dict) -> None:
    from rich.table import Table

    from ..console import out

    config, pre = info["config"], info["preprocess"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    height, width = config["image_size"]
    rows = [
        ("model", printable(info["reference"])),
        ("source format", info["source_format"]),
        (
            "architecture",
            f"{printable(info['name'] or 'custom')} ViT, patch {config['patch_size']}, "
            f"image {height}x{width}",
        ),
        (
            "width / depth / heads / mlp",
            f"{config['width']} / {config['depth']} / {config['num_heads']} / {config['mlp_dim']}",
        ),
        ("parameters", _count(info["num_parameters"])),
        *_family_rows(info["family"]),
        ("position embedding", f"{config['pos_embed']}, pool {config['pool']}"),
        ("activation / ln eps", f"{config['act']} / {config['ln_eps']:g}"),
        ("qkv bias", str(config["qkv_bias"])),
    ]
    labels = info["labels"]
    if labels:
        # " | " because ImageNet names contain commas ("tench, Tinca tinca").
        shown = labels if len(labels) <= ALL_LABELS_UP_TO else labels[:SHOWN_LABELS] + ["..."]
        rows.append(("labels", f"{len(labels)}: {printable(' | '.join(shown))}"))
    else:
        rows.append(("labels", "none (no classifier head: features only)"))
    size = f"{pre['size'][0]}x{pre['size'][1]}"
    if pre["resize"] == "squash":
        resize = f"squash to {size}"
    else:
        resize = f"shorter side to size/{pre['crop_pct']:g}, center crop {size}"
    rows.append(("preprocessing", f"{resize}, {pre['interpolation']}"))
    rows.append(("mean / std", f"{_triple(pre['mean'])} / {_triple(pre['std'])}"))
    extra = info["extra"]
    for dropped in extra.get("dropped", []):
        rows.append(("dropped", printable(str(dropped))))
    shown_extra = {
        "note": "note",
        "source": "source",
        "architecture": "timm architecture",
        "tag": "timm tag",
        "layout": "npz layout",
        "prefix": "npz key prefix",
        "weights_file": "weights file",
        "quantization": "int8 weights",  # `vit convert --int8`: runs on the CPU only
    }
    for key, title in shown_extra.items():
        if extra.get(key) not in (None, "", False):
            rows.append((title, printable(str(extra[key]))))
    for note in extra.get("preprocess_notes", []):
        rows.append(("preprocessing note", printable(note)))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def _family_rows(family: dict) -> list[tuple[str, str]]:
    """The family block of `vit info`: what the tokens are and what the embedding is."""
    scale = family["layer_scale"]
    rows = [
        ("family", printable(str(family["family"]))),
        ("prefix tokens", f"{family['prefix_tokens']} ({family['prefix']})"),
        ("pooling", printable(str(family["pooling"]))),
        ("embedding size", f"{family['embedding_dim']} (vit embed)"),
        ("head", printable(str(family["head"]))),
        ("layer scale", "off" if scale is None else f"on (init {scale:g})"),
        ("mlp", printable(str(family["mlp"]))),
        ("position resampling", printable(str(family["position_resampling"]))),
    ]
    if family["extras"]:
        rows.append(("also", printable(", ".join(family["extras"]))))
    return rows


def _count(number: int) -> str:
    short = f"{number / 1e6:.1f}M" if number >= 100_000 else f"{number / 1e3:.1f}K"
    return f"{number:,} ({short})"


def _triple(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def info(
    model: str = typer.Argument(
        ...,
        help="Our .safetensors file, an HF or timm folder, a Google .npz, a hub id, "
        "or vit-shapes-p16 (the bundled model).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON (all labels included) for scripts."
    ),
) -> None:
    """Show a checkpoint's architecture, parameters, labels, preprocessing and source format."""
    from ..weights.resolve import load_model

    data = summarize(load_model(model))
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        _render_info(data)


def convert(
    source: str = typer.Argument(..., help="Any model reference: file, folder, .npz or hub id."),
    destination: Path = typer.Argument(..., help="Output file, ending in .safetensors."),
    fp16: bool = typer.Option(
        False, "--fp16", help="Store the weights as float16 (half the size)."
    ),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="Store the Linear layers quantised to int8 (a quarter of the size; runs on the "
        "CPU only, as --int8 does, without quantising again). docs/int8.md",
    ),
) -> None:
    """Write any supported checkpoint in our format (one .safetensors file with metadata)."""
    if destination.suffix.lower() != ".safetensors":
        raise InputError(f"{destination}: the output must end in .safetensors")
    if destination.is_dir():
        raise InputError(f"{destination}: is a folder; give a file name ending in .safetensors")
    if fp16 and int8:
        raise OptionError("--fp16 and --int8 are two ways to store the weights: choose one")
    import torch

    from ..console import out
    from ..model.int8 import is_quantized, quantize
    from ..weights.format import save_model
    from ..weights.int8 import save_quantized
    from ..weights.resolve import load_model

    bundle = load_model(source)
    source_text = f"{bundle.source_format}: {source}"
    if is_quantized(bundle.model) and not int8:
        raise OptionError(
            f"{source} holds int8 weights; the float ones are gone: add --int8 to copy it, "
            "or convert the float model"
        )
    if int8:
        # In place: no second copy of a large model's weights; the file stores what ran.
        bundle.model = quantize(bundle.model, inplace=True)
        save_quantized(bundle, destination, source=source_text)
    else:
        save_model(bundle, destination, dtype=torch.float16 if fp16 else None, source=source_text)
    size_mb = destination.stat().st_size / 1e6
    name = bundle.config.name or "custom"
    stored = "int8" if int8 else "float16" if fp16 else "float32"
    out.print(
        f"wrote {destination} ({name}, {len(bundle.labels)} labels, {stored}, {size_mb:.1f} MB)",
        highlight=False,
        markup=False,
    )


def fetch(
    repo_id: str = typer.Argument(..., help="A hub id such as google/vit-base-patch16-224."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
) -> None:
    """Download a hub model into the Hugging Face cache so later runs work offline."""
    from ..console import out
    from ..weights.hub import download

    folder = download(repo_id, revision=revision)
    out.print(str(folder), highlight=False, markup=False, soft_wrap=True)


INFO_EXAMPLES = """\
[bold]Examples[/]

  vit info bundled
  vit info google/vit-base-patch16-224
  vit info ./my-model/ --json
"""

CONVERT_EXAMPLES = """\
[bold]Examples[/]

  vit convert google/vit-base-patch16-224 vit-b16.safetensors
  vit convert ViT-B_16.npz vit-b16-21k.safetensors --fp16
  vit convert google/vit-base-patch16-224 vit-b16-int8.safetensors --int8
"""

FETCH_EXAMPLES = """\
[bold]Examples[/]

  vit fetch google/vit-base-patch16-224
  vit fetch facebook/dinov2-small --revision main
"""


def register(app: typer.Typer) -> None:
    app.command("info", epilog=INFO_EXAMPLES)(info)
    app.command("convert", epilog=CONVERT_EXAMPLES)(convert)
    app.command("fetch", epilog=FETCH_EXAMPLES)(fetch)
