"""`vit export MODEL OUT.onnx`: an ONNX graph with its preprocessing and labels attached.

No torch or onnx at import time: they are imported inside the command.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ..errors import OptionError
from ..runtime import MAX_IMAGE_SIDE
from .common import whole_number

MIN_OPSET, MAX_OPSET = 14, 20  # the TorchScript exporter's range (services/onnx_graph.py)


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """'384' or '384x512' (height x width) -> (384, 384) / (384, 512); each side 1 to
    MAX_IMAGE_SIDE, checked before anything is allocated (a usage error: exit 2)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise OptionError(f"--image-size {text!r}: use N or HxW, e.g. 224 or 384x512")
    sides = [side for side in match.groups() if side is not None]
    # Compared as text first: int() of a 5,000-digit number raises instead of comparing.
    if any(len(side.lstrip("0")) > 9 for side in sides) or not all(
        1 <= int(side) <= MAX_IMAGE_SIDE for side in sides
    ):
        raise OptionError(
            f"--image-size {text.strip()}: each side must be from 1 to {MAX_IMAGE_SIDE} pixels"
        )
    height = int(sides[0])
    return height, int(sides[-1])


def export(
    model: str = typer.Argument(
        ..., help="Model file, folder or hub id (as --model elsewhere; 'bundled': the bundled one)."
    ),
    destination: Path = typer.Argument(..., help="Output file, ending in .onnx."),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="Quantise the Linear layers (ONNX Runtime dynamic int8, per-channel, reduced range).",
    ),
    image_size: str | None = typer.Option(
        None,
        "--image-size",
        metavar="SIZE",
        show_default=False,
        help="Input size baked into the graph: N or HxW. "
        "\\[default: the model's preprocessing size]",
    ),
    opset: int | None = typer.Option(
        None,
        "--opset",
        metavar="N",
        parser=whole_number("--opset", MIN_OPSET, MAX_OPSET),
        show_default=False,
        help="ONNX opset (14-20). \\[default: 17]",
    ),
    attention_layers: list[int] | None = typer.Option(
        None,
        "--attention-layer",
        metavar="N",
        show_default=False,
        help="Also output this layer's softmax attention (B, heads, T, T); repeat for more; "
        "-1 is the last.",
    ),
) -> None:
    """Export a model to ONNX (dynamic batch), checked against vitcli's own forward.

    Needs the onnx extra: pip install 'vitcli[onnx]'. Guide: docs/export.md.
    """
    if destination.suffix.lower() != ".onnx":
        raise OptionError(f"{destination}: the output must end in .onnx")
    if destination.is_dir():
        raise OptionError(f"{destination}: is a folder; give a file name ending in .onnx")
    size = parse_image_size(image_size)
    from ..services.export import require_onnx

    require_onnx()  # before the (slow) model load: say at once what to install

    from ..console import err, out, terminal_safe
    from ..services.export import export_onnx

    def stage(message: str) -> None:
        err.print(f"[dim]{message}...[/]", highlight=False)

    result = export_onnx(
        model,
        destination,
        int8=int8,
        image_size=size,
        opset=opset,
        attention_layers=attention_layers or (),
        on_stage=stage,
    )
    height, width = result.image_size
    kind = "int8" if result.int8 else "float32"
    out.print(
        terminal_safe(
            f"wrote {result.path} ({result.model_name}, {kind}, {height}x{width}, "
            f"opset {result.opset}, outputs {', '.join(result.outputs)}, "
            f"{result.size_bytes / 1e6:.1f} MB)"
        ),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if result.verified:
        line = f"onnxruntime vs vitcli: max abs diff {result.max_abs_diff:.2e}"
        if result.attention_max_abs_diff is not None:
            line += f" (attention {result.attention_max_abs_diff:.2e})"
        if result.int8 and result.top1_agreement is not None:
            line += f", top-1 agreement with float32 {result.top1_agreement:.0%}"
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    for note in result.notes:
        out.print(terminal_safe(note), highlight=False, markup=False, soft_wrap=True)


EXAMPLES = """\
[bold]Examples[/]

  vit export bundled model.onnx
  vit export google/vit-base-patch16-224 b16-int8.onnx --int8
  vit export run/best.safetensors model.onnx --image-size 384 --attention-layer -1
"""


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EXAMPLES)(export)
