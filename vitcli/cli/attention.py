"""`vit attention`: per-head attention maps and rollout as overlays, plus the raw maps.

Parses the options into one `AttentionOptions`, runs the service with a progress bar, prints
the summary. Loading the model, collecting inputs and writing happen in the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..services.attention.options import (
    Colormap,
    HeadFusion,
    Interpolation,
    MapsFormat,
    Scale,
    Style,
)
from ..text import terminal_safe
from .common import (
    DeviceOption,
    DType,
    DTypeOption,
    FastDecodeOption,
    Int8Option,
    ModelOption,
    QuietOption,
    WorkersOption,
)

EXAMPLES = """\
[b]Examples[/b]

  vit attention photos/ --html                 [dim]# a sheet per image, index.html to browse[/dim]
  vit attention cat.jpg --layer all --per-head [dim]# every layer, one PNG per head[/dim]
  vit attention cat.jpg --style mask --blur 16 [dim]# the paper's Fig. 6 look[/dim]
  vit attention cat.jpg --method rollout,gae -t top1 -t top2 [dim]# why this class[/dim]
  vit attention photos/ --html --explore       [dim]# + an interactive page per image[/dim]
  vit attention cat.jpg --threshold 0.6 -m timm/vit_small_patch16_224.augreg_in21k_ft_in1k
"""


def parse_method_options(specs: list[str] | None, rollout: bool) -> tuple[bool, tuple[str, ...]]:
    """--method values -> (per-head maps wanted, other methods). Without --method: per-head
    maps and rollout, or per-head maps only with --no-rollout."""
    from ..explain.registry import parse_methods

    if not specs:
        return True, ("rollout",) if rollout else ()
    chosen = parse_methods(specs)
    return "raw" in chosen, tuple(name for name in chosen if name != "raw")


def register(app: typer.Typer) -> None:
    @app.command("attention", epilog=EXAMPLES)
    def attention(
        inputs: Annotated[
            list[str],
            typer.Argument(
                metavar="INPUTS",
                show_default=False,
                help="Image files, folders (recursive), quoted globs, or '-' for paths on stdin.",
            ),
        ],
        model: ModelOption = None,
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                "-o",
                metavar="DIR",
                help="Output folder; one subfolder per image. Scans never read images from it.",
            ),
        ] = Path("attention"),
        layer: Annotated[
            list[str] | None,
            typer.Option(
                "--layer",
                "-l",
                metavar="N|all",
                show_default=False,
                help="Layers for per-head maps: an index (negative from the end), repeatable "
                "or comma-separated, or 'all'. \\[default: -1, the last]",
            ),
        ] = None,
        method: Annotated[
            list[str] | None,
            typer.Option(
                "--method",
                metavar="METHOD",
                show_default=False,
                help="Maps to draw, repeatable or comma-separated: raw, rollout, gae, attribution, "
                "gradcam. raw: per-head maps of --layer; rollout: all layers; gae, attribution, "
                "gradcam: why this class, one map per --target. \\[default: raw,rollout]",
            ),
        ] = None,
        target: Annotated[
            list[str] | None,
            typer.Option(
                "--target",
                "-t",
                metavar="CLASS",
                show_default=False,
                help="Class that gae/attribution/gradcam explain: top1, top2, ..., a label or "
                "an index; repeatable (one map per target). raw and rollout are the same for every "
                "class. \\[default: top1]",
            ),
        ] = None,
        rollout: Annotated[
            bool,
            typer.Option(
                "--rollout/--no-rollout",
                metavar="",
                help="Without --method: draw rollout beside the per-head maps (--no-rollout: "
                "per-head maps only).",
            ),
        ] = True,
        head_fusion: Annotated[
            HeadFusion, typer.Option("--head-fusion", help="Rollout: how heads are fused.")
        ] = HeadFusion.mean,
        discard_ratio: Annotated[
            float,
            typer.Option(
                "--discard-ratio",
                metavar="X",
                help="Rollout: zero this fraction (0 to below 1) of the lowest patch weights per "
                "row (CLS kept).",
            ),
        ] = 0.0,
        threshold: Annotated[
            float | None,
            typer.Option(
                "--threshold",
                metavar="X",
                show_default=False,
                help="Outline, per head, the top patches holding this share (above 0, up to 1) "
                "of the mass (DINO; e.g. 0.6).",
            ),
        ] = None,
        per_head: Annotated[
            bool,
            typer.Option(
                "--per-head",
                metavar="",
                help="Also write one overlay PNG per head, head mean and rollout.",
            ),
        ] = False,
        style: Annotated[
            Style,
            typer.Option(
                "--style",
                help="heatmap: colormap blend; mask: the photo dimmed where attention is low, "
                "to 30% where it is 0 (the paper's Fig. 6 dims to black: alpha 1).",
            ),
        ] = Style.heatmap,
        colormap: Annotated[
            Colormap,
            typer.Option(
                "--colormap",
                help="Heatmap colours: viridis, inferno, magma, plasma, jet, gray or hot.",
            ),
        ] = Colormap.viridis,
        alpha: Annotated[
            float | None,
            typer.Option(
                "--alpha",
                metavar="X",
                show_default=False,
                help="Overlay strength, 0 to 1. \\[default: 0.5 heatmap, 0.7 mask]",
            ),
        ] = None,
        interpolation: Annotated[
            Interpolation,
            typer.Option("--interpolation", help="nearest shows the true patch blocks."),
        ] = Interpolation.bilinear,
        scale: Annotated[
            Scale,
            typer.Option(
                "--scale",
                help="per-map: each map from 0 to its own peak, so every target's and every "
                "head's map shows (compare them by the peak printed on each tile); shared: one "
                "colour range for all heads of an image and one per method (its targets), so "
                "weak maps look weak.",
            ),
        ] = Scale.per_map,
        blur: Annotated[
            float,
            typer.Option(
                "--blur",
                metavar="PIXELS",
                help="Gaussian blur sigma in original pixels (the paper uses ~ the patch size).",
            ),
        ] = 0.0,
        tile: Annotated[
            int,
            typer.Option(
                "--tile",
                metavar="N",
                help="Sheet tile size, 32 to 1024 px: a square image's side; other shapes keep "
                "its area (a 4:1 image's tiles are 2x wide, 1/2 high).",
            ),
        ] = 224,
        html: Annotated[
            bool,
            typer.Option(
                "--html", metavar="", help="Write index.html, a contact sheet linking every sheet."
            ),
        ] = False,
        explore: Annotated[
            bool,
            typer.Option(
                "--explore",
                metavar="",
                help="Also write explorer.html per image: pick a layer, head and query patch "
                "in the browser (self-contained; linked from index.html).",
            ),
        ] = False,
        maps_format: Annotated[
            MapsFormat,
            typer.Option(
                "--maps-format", help="maps.safetensors, or one .npy per array (numpy.load)."
            ),
        ] = MapsFormat.safetensors,
        batch_size: Annotated[
            int | None,
            typer.Option(
                "--batch-size",
                "-b",
                metavar="N",
                show_default=False,
                help="Images per forward pass. \\[default: 32, fewer for large models: the "
                "attention weights of every layer are kept]",
            ),
        ] = None,
        workers: WorkersOption = None,
        device: DeviceOption = "auto",
        dtype: DTypeOption = DType.auto,
        int8: Int8Option = False,
        fast_decode: FastDecodeOption = False,
        quiet: QuietOption = False,
    ) -> None:
        """Attention maps: per-head CLS maps, rollout, and class-specific maps (gae, attribution, \
gradcam) as overlays on the original image.

        Writes OUT/<image stem>/sheet.png, maps.safetensors (or .npy) and meta.json per image.
        """
        from ..runtime import prefer_passive_waiting, resolve_workers

        prefer_passive_waiting()  # before torch loads: decoders share the CPU with the model
        from rich.markup import escape

        from ..console import make_progress, print_error, print_line, print_warning
        from ..services.attention import AttentionOptions, run

        heads, methods = parse_method_options(method, rollout)
        worker_count, warning = resolve_workers(workers)
        if warning:
            print_warning(warning)
        options = AttentionOptions(
            inputs=tuple(inputs),
            out=out,
            model=model,
            layers=tuple(layer or ("-1",)),
            heads=heads,
            methods=methods,
            targets=tuple(target or ("top1",)),
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            threshold=threshold,
            per_head=per_head,
            style=style,
            colormap=colormap,
            alpha=alpha,
            interpolation=interpolation,
            scale=scale,
            blur=blur,
            tile=tile,
            html=html,
            explore=explore,
            maps_format=maps_format,
            batch_size="auto" if batch_size is None else batch_size,
            workers=worker_count,
            device=device,
            dtype=dtype.value,
            int8=int8,
            fast_decode=fast_decode,
        )
        with make_progress(quiet=quiet) as bar:
            task = bar.add_task("attention", total=None, rate="")

            def on_progress(done: int, total: int) -> None:
                bar.update(task, total=total, completed=done)
                elapsed = bar.tasks[task].elapsed or 0.0
                rate = f"{done / elapsed:.1f} img/s" if elapsed > 0 and done else ""
                bar.update(task, rate=rate)

            def on_failure(path: str, message: str) -> None:
                print_error(terminal_safe(message))

            summary = run(options, on_progress, on_failure=on_failure)
        for warning in summary.warnings:
            print_warning(terminal_safe(warning))
        failed = len(summary.failures)
        if failed or not quiet:
            where = escape(terminal_safe(str(summary.out_dir)))
            line = f"{len(summary.written)} of {summary.total} images written to {where}"
            line += f", [red]{failed} failed[/]" if failed else ""
            line += f" in {summary.seconds:.1f} s"
            if summary.index_html is not None:
                line += f"; contact sheet {escape(terminal_safe(str(summary.index_html)))}"
            print_line(line)
        if summary.failures:
            raise typer.Exit(1)
