"""`vit embed`: one pooled embedding per image, for retrieval, clustering and dedup.

The command parses options, shows progress and prints the summary; the service
(services/embed.run) does the rest. Guide: docs/embed.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    BatchSizeOption,
    Command,
    DeviceOption,
    DType,
    DTypeOption,
    FastDecodeOption,
    Int8Option,
    ModelOption,
    QuietOption,
    WorkersOption,
    batch_progress,
    batch_summary,
)

EXAMPLES = """\
[bold]Examples[/]

  vit embed photos/ -o emb.safetensors -m facebook/dinov2-small
  vit embed photos/ -o emb.npy -m openai/clip-vit-base-patch32   [dim]# + emb.npy.paths.jsonl[/]
  vit embed 'shots/*.png' -o emb.jsonl --pool cls+mean            [dim]# streamed[/]

Exit status: 0 when every image was embedded, 1 when any failed (the others are still \
written) or the run could not start, 2 for a usage error. Guide: docs/embed.md.
"""


def embed(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT",
            show_default=False,
            help="Image files, folders (searched recursively), quoted globs, or - for paths "
            "from stdin.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            dir_okay=False,  # an existing folder is a usage error (exit 2), as in predict
            show_default=False,
            help="Where embeddings go: .safetensors or .npy (written atomically at the end, "
            "with the paths) or .jsonl (streamed).",
        ),
    ],
    model: ModelOption = None,
    pool: Annotated[
        str,
        typer.Option(
            "--pool",
            metavar="POOL",
            help="default (the family's embedding: CLS after the final norm, the CLIP/SigLIP "
            "projection or attention pool), cls, mean (patch tokens) or cls+mean.",
        ),
    ] = "default",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    dtype: DTypeOption = DType.auto,
    int8: Int8Option = False,
    fast_decode: FastDecodeOption = False,
    quiet: QuietOption = False,
) -> None:
    """Embed images: one vector per image, in input order, with the paths.

    Under torchrun each rank embeds its own share and rank 0 writes the file.
    """
    from ..runtime import resolve_workers
    from ..services.early import early_start

    worker_count, clamped = resolve_workers(workers)
    # Inputs collected and images decoding from now on, while torch is imported (early.py).
    with early_start(
        model, inputs, batch_size=batch_size, workers=worker_count, fast_decode=fast_decode
    ) as early:
        from .. import distributed
        from ..console import markup, print_line, print_note, print_warning
        from ..services import embed as service

        options = service.EmbedOptions(
            output=output,
            inputs=tuple(inputs),
            model=model,
            pool=pool,
            batch_size=batch_size,
            workers=worker_count,
            device=device,
            dtype=dtype.value,
            int8=int8,
            fast_decode=fast_decode,
        )
        main = distributed.is_main()
        if clamped and main:
            print_warning(clamped)
        show = main and not quiet
        progress, on_progress = batch_progress("embed", show)

        with progress:
            result = service.run(
                options,
                on_progress if show else None,
                on_warning=print_warning,
                on_note=print_note if show else None,
                early=early,
            )
        summary = result.summary
        if result.is_main and (summary.failed or not quiet):
            verb = f"embedded ({result.dim} numbers each)"
            tail = f" -> {markup(str(result.output))}"
            print_line(batch_summary(summary, verb, result.device, tail))
        # As predict: a completed distributed run exits 0 on every rank (failures are recorded).
        if summary.failed and summary.world_size == 1:
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("embed", cls=Command, epilog=EXAMPLES)(embed)
