"""`vit attention`: per-head attention maps and rollout as overlays, plus the raw maps."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("attention")
    def attention(
        inputs: list[str] = typer.Argument(
            ...,
            metavar="INPUTS",
            help="Image files, folders (recursive), quoted globs, or '-' for paths on stdin.",
        ),
        model: str | None = typer.Option(
            None, "--model", "-m", help="Model file, folder or hub id; default: the bundled model."
        ),
        out: Path = typer.Option(
            Path("attention"), "--out", "-o", help="Output folder; one subfolder per image."
        ),
        layer: list[str] | None = typer.Option(
            None,
            "--layer",
            "-l",
            help="Layer(s) for per-head maps: an index (negative from the end), repeatable or comma-separated, or 'all'. Default: the last.",
        ),
        rollout: bool = typer.Option(
            True, "--rollout/--no-rollout", help="Compute attention rollout over all layers."
        ),
        head_fusion: str = typer.Option(
            "mean", "--head-fusion", help="Rollout head fusion: mean, max or min."
        ),
        discard_ratio: float = typer.Option(
            0.0,
            "--discard-ratio",
            help="Rollout: zero this fraction of the lowest patch weights per row (CLS kept).",
        ),
        threshold: float | None = typer.Option(
            None,
            "--threshold",
            help="DINO mass threshold per head, e.g. 0.6: mask of the top patches holding that mass.",
        ),
        per_head: bool = typer.Option(
            False, "--per-head", help="Also write one overlay PNG per head, head mean and rollout."
        ),
        style: str = typer.Option(
            "heatmap",
            "--style",
            help="heatmap (colormap blend) or mask (image dimmed where attention is low, Fig. 6).",
        ),
        colormap: str = typer.Option(
            "viridis", "--colormap", help="viridis, inferno, magma, plasma, jet, gray or hot."
        ),
        alpha: float | None = typer.Option(
            None, "--alpha", help="Overlay strength in [0, 1]; default 0.5 heatmap, 1.0 mask."
        ),
        interpolation: str = typer.Option(
            "bilinear", "--interpolation", help="nearest (true patch blocks), bilinear or bicubic."
        ),
        scale: str = typer.Option(
            "per-map",
            "--scale",
            help="per-map, or shared: one range for all head maps of an image.",
        ),
        blur: float = typer.Option(
            0.0,
            "--blur",
            help="Gaussian blur sigma in original pixels (the paper uses ~ the patch size).",
        ),
        tile: int = typer.Option(224, "--tile", help="Long side of each sheet tile, pixels."),
        html: bool = typer.Option(
            False, "--html", help="Write index.html, a contact sheet linking every sheet."
        ),
        maps_format: str = typer.Option(
            "safetensors",
            "--maps-format",
            help="safetensors (maps.safetensors) or npy (one .npy per array).",
        ),
        batch_size: int | None = typer.Option(
            None,
            "--batch-size",
            "-b",
            min=1,
            show_default=False,
            help="Images per forward pass. Default: 32, fewer for large models (attention weights of every layer are kept).",
        ),
        workers: int | None = typer.Option(
            None,
            "--workers",
            "-w",
            min=0,
            show_default=False,
            help="Decoding worker processes (0: decode in the main process). Default: half the CPUs, at most 8.",
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
        quiet: bool = typer.Option(
            False, "--quiet", "-q", help="No progress bar and no summary unless something failed."
        ),
    ) -> None:
        """Attention maps: per-head CLS maps, head means, rollout; overlays on the original image.

        Writes OUT/<image stem>/sheet.png, maps.safetensors (or .npy) and meta.json per image.
        """
        from ..runtime import prefer_passive_waiting

        prefer_passive_waiting()  # before torch loads: decoders share the CPU with the model
        from rich.markup import escape

        from ..console import err, make_progress, print_error
        from ..data.inputs import collect_inputs
        from ..services.attention import AttentionOptions, parse_layers, run_attention
        from ..services.render import RenderOptions
        from ..weights.resolve import load_model

        items = collect_inputs(inputs)
        render_options = RenderOptions(
            style=style,
            colormap=colormap,
            alpha=alpha,
            interpolation=interpolation,
            scale=scale,
            blur=blur,
            tile=tile,
        )
        bundle = load_model(model)
        options = AttentionOptions(
            layers=parse_layers(layer, bundle.config.depth),
            rollout=rollout,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            threshold=threshold,
        )
        with make_progress(quiet=quiet) as bar:
            task = bar.add_task("attention", total=len(items), rate="")

            def advance(count: int) -> None:
                bar.advance(task, count)
                elapsed = bar.tasks[task].elapsed or 0.0
                done = bar.tasks[task].completed
                bar.update(task, rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 else "")

            summary = run_attention(
                bundle,
                items,
                out,
                options,
                render_options,
                per_head=per_head,
                html=html,
                maps_format=maps_format,
                batch_size=batch_size,
                workers=workers,
                device=device,
                progress=advance,
                on_failure=lambda path, message: print_error(message),
            )
        failed = len(summary.failures)
        if failed or not quiet:
            line = f"{len(summary.written)} of {summary.total} images written to {escape(str(summary.out_dir))}"
            line += f", [red]{failed} failed[/]" if failed else ""
            line += f" in {summary.seconds:.1f} s"
            if summary.index_html is not None:
                line += f"; contact sheet {escape(str(summary.index_html))}"
            err.print(line, highlight=False, soft_wrap=True)
        if summary.failures:
            raise typer.Exit(1)
