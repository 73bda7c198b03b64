"""`vit info`, `vit convert` and `vit fetch`: look at, convert and download checkpoints.

No torch at import time: the loaders are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import typer

ALL_LABELS_UP_TO = 20  # fewer labels than this are all shown; more: the first SHOWN_LABELS
SHOWN_LABELS = 5


def printable(text: str) -> str:
    """Text from a checkpoint for the table: control characters as escapes, markup escaped."""
    from ..console import markup

    return markup(text)


def _render_info(info: dict) -> None:
    from rich.table import Table

    from ..console import out
    from ..data.preprocess import Preprocess

    config, pre = info["config"], info["preprocess"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    height, width = config["image_size"]
    rows = [
        ("model", printable(info["reference"])),
        ("source format", printable(str(info["source_format"]))),
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
        ("position embedding", printable(f"{config['pos_embed']}, pool {config['pool']}")),
        # The activation is in the family's "mlp" row above.
        ("layer norm eps", f"{config['ln_eps']:g}"),
        ("qkv bias", str(config["qkv_bias"])),
    ]
    labels = info["labels"]
    if labels:
        # " | " because ImageNet names contain commas ("tench, Tinca tinca").
        shown = labels if len(labels) <= ALL_LABELS_UP_TO else labels[:SHOWN_LABELS] + ["..."]
        rows.append(("labels", f"{len(labels)}: {printable(' | '.join(shown))}"))
    else:
        rows.append(("labels", "none (no classifier head: features only)"))
    rows.append(("preprocessing", Preprocess.from_dict(pre).describe()))
    rescale = "" if abs(pre["rescale"] - 1 / 255) < 1e-12 else f", rescale x{pre['rescale']:g}"
    rows.append(
        (
            "decode",
            ("EXIF orientation, " if pre["exif"] else "no EXIF orientation, ")
            + _RGB_WORDS[pre["rgb"]]
            + rescale,
        )
    )
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
        "run_model": "run folder",  # `-m runs/a`: which file of the run
        "quantization": "int8 weights",  # `vit convert --int8`: runs on the CPU only
    }
    for key, title in shown_extra.items():
        if extra.get(key) not in (None, "", False):
            rows.append((title, printable(str(extra[key]))))
    for note in extra.get("preprocess_notes", []):
        rows.append(("preprocessing note", printable(note)))
    # Where each value came from, grouped by source ("preprocessor_config.json size" and
    # "... crop_size" under one file name).
    grouped: dict[str, list[str]] = {}
    for key, where in (pre.get("origins") or {}).items():
        if key == "decode":  # the decode row says it
            continue
        source, _, field = where.rpartition(" ")
        if field != key:
            source, field = where, key
        grouped.setdefault(source, []).append(field)
    for source, keys in grouped.items():
        rows.append((f"  from {printable(source)}", printable(", ".join(keys))))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


_RGB_WORDS = {
    "pil": "PIL convert('RGB')",
    "hf": "PIL convert('RGB'), transparent colour on white",
    "viewer": "alpha on white, 16-bit scaled",
    "late": "PIL convert('RGB') after the resize",
}


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
    from ..services.models import describe

    data = describe(model)
    if as_json:
        from ..text import json_document

        typer.echo(json_document(data))
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
    from ..console import out
    from ..services.models import convert_model

    result = convert_model(source, destination, fp16=fp16, int8=int8)
    out.print(
        f"wrote {result.path} ({result.name}, {result.labels} labels, {result.stored}, "
        f"{result.size_bytes / 1e6:.1f} MB)",
        highlight=False,
        markup=False,
    )


def fetch(
    repo_id: str = typer.Argument(..., help="A hub id such as google/vit-base-patch16-224."),
    revision: str = typer.Option(
        None, "--revision", metavar="REV", help="Branch, tag or commit (default: main)."
    ),
) -> None:
    """Download a hub model into the Hugging Face cache so later runs work offline."""
    from ..console import out
    from ..services.models import fetch_model

    folder = fetch_model(repo_id, revision=revision)
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
