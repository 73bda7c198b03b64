"""`vit train`: parse the options, call services.train.run, render progress and the result."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from ..services.train_choices import Amp, Pool, PosEmbed  # torch-free: --help stays light
from ..text import terminal_safe
from .common import BatchSizeOption, DeviceOption, JobsAlias, TrainWorkersOption

_SCRATCH = "From scratch only"
_OPT = "Optimisation"
_AUG = "Augmentation"


def _float(flag: str, help: str, panel: str | None = None, metavar: str = "X"):
    return typer.Option(flag, help=help, rich_help_panel=panel, metavar=metavar)


def train(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Training folder: one subfolder of images per class (optional with --resume).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", metavar="DIR", help="Output folder for checkpoints, metrics and config."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", metavar="DIR", help="Continue the run saved in this folder, up to --epochs."
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            metavar="REF",
            help="A variant to train from scratch (Ti/16, S/16, B/16, ...) or a model to "
            "fine-tune (file, folder, hub id).",
        ),
    ] = "Ti/16",
    linear_probe: Annotated[
        bool,
        typer.Option(
            "--linear-probe",
            metavar="",
            help="Freeze the --model backbone and train only a new linear head on its pooled "
            "features; without --randaugment/--mixup/--cutmix the features are computed once "
            "per image (fast).",
        ),
    ] = False,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            metavar="N",
            help="Epochs. \\[default: 30 scratch, 10 fine-tune]",
            show_default=False,
        ),
    ] = None,
    batch_size: BatchSizeOption = 64,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            metavar="N",
            help="Input side, 8 to 4096, a multiple of the patch size. "
            "\\[default: 224 scratch, the model's own when fine-tuning]",
            show_default=False,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        _float("--lr", "Peak learning rate. \\[default: 1e-3 scratch, 1e-4 fine-tune]", _OPT),
    ] = None,
    min_lr: Annotated[
        float, _float("--min-lr", "Learning rate at the end of the cosine (<= --lr).", _OPT)
    ] = 1e-6,
    weight_decay: Annotated[
        float | None,
        _float(
            "--weight-decay",
            "AdamW decoupled weight decay, not on biases/norms/pos_embed/cls. \\[default: 0.05]",
            _OPT,
        ),
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        _float(
            "--warmup-epochs",
            "Linear warmup length. \\[default: min(5, 10% of epochs) scratch, 10% fine-tune]",
            _OPT,
        ),
    ] = None,
    beta2: Annotated[float, _float("--beta2", "AdamW's second-moment decay.", _OPT)] = 0.999,
    label_smoothing: Annotated[
        float, _float("--label-smoothing", "Label smoothing of the cross-entropy, 0 to 0.99.", _OPT)
    ] = 0.1,
    grad_clip: Annotated[
        float, _float("--grad-clip", "Clip the global gradient norm to this; 0 turns it off.", _OPT)
    ] = 1.0,
    ema: Annotated[
        float,
        _float(
            "--ema",
            "Keep an EMA of the weights with this decay per step (e.g. 0.999) and save it; 0: off.",
            _OPT,
        ),
    ] = 0.0,
    amp: Annotated[
        Amp,
        typer.Option(
            "--amp",
            help="auto: bf16 autocast on a CUDA GPU with bf16, or on a CPU with native bf16 "
            "when a short start-up timing finds it faster for this model (a resume keeps the "
            "run's choice); off: float32.",
            rich_help_panel=_OPT,
        ),
    ] = Amp.auto,
    crop_scale: Annotated[
        float | None,
        _float(
            "--crop-scale",
            "Smallest area of the random resized crop, (0, 1]. "
            "\\[default: 0.35 scratch, 0.5 fine-tune]",
            _AUG,
        ),
    ] = None,
    hflip: Annotated[
        bool,
        typer.Option(
            "--hflip/--no-hflip", help="Random horizontal flips.", rich_help_panel=_AUG, metavar=""
        ),
    ] = True,
    randaugment: Annotated[
        int,
        typer.Option(
            "--randaugment",
            metavar="N",
            help="RandAugment-like ops per image, 0 to 16; 0: off (try 2).",
            rich_help_panel=_AUG,
        ),
    ] = 0,
    randaugment_magnitude: Annotated[
        int,
        typer.Option(
            "--randaugment-magnitude",
            metavar="M",
            help="RandAugment magnitude, 0 to 10.",
            rich_help_panel=_AUG,
        ),
    ] = 9,
    mixup: Annotated[
        float, _float("--mixup", "Mixup alpha, 0 to 100; 0: off (try 0.8).", _AUG, "ALPHA")
    ] = 0.0,
    cutmix: Annotated[
        float,
        _float(
            "--cutmix",
            "Cutmix alpha, 0 to 100; 0: off (try 1.0). With mixup, one of the two per batch.",
            _AUG,
            "ALPHA",
        ),
    ] = 0.0,
    pos_embed: Annotated[
        PosEmbed,
        typer.Option("--pos-embed", help="learned, or sincos2d (fixed).", rich_help_panel=_SCRATCH),
    ] = PosEmbed.learned,
    pool: Annotated[
        Pool,
        typer.Option(
            "--pool",
            help="cls (read the CLS token) or mean (average the patch tokens).",
            rich_help_panel=_SCRATCH,
        ),
    ] = Pool.cls,
    depth: Annotated[
        int | None,
        typer.Option(
            "--depth",
            metavar="N",
            help="Override the variant's number of blocks.",
            rich_help_panel=_SCRATCH,
        ),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(
            "--width", metavar="N", help="Override the variant's width D.", rich_help_panel=_SCRATCH
        ),
    ] = None,
    heads: Annotated[
        int | None,
        typer.Option(
            "--heads",
            "--num-heads",
            metavar="N",
            help="Override the variant's number of heads.",
            rich_help_panel=_SCRATCH,
        ),
    ] = None,
    mlp_dim: Annotated[
        int | None,
        typer.Option(
            "--mlp-dim",
            metavar="N",
            help="Override the variant's MLP size.",
            rich_help_panel=_SCRATCH,
        ),
    ] = None,
    dropout: Annotated[
        float, _float("--dropout", "Dropout after attention/MLP projections, 0 to 0.9.")
    ] = 0.0,
    drop_path: Annotated[
        float, _float("--drop-path", "Stochastic depth rate of the last block, 0 to 0.9.")
    ] = 0.0,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            metavar="N",
            help="Seed of initialisation, data order, augmentation and split (0 to 2^63-1).",
        ),
    ] = 0,
    val: Annotated[
        Path | None,
        typer.Option("--val", metavar="DIR", help="Validation folder (the same class subfolders)."),
    ] = None,
    val_split: Annotated[
        float,
        _float("--val-split", "Hold out this fraction of each class for validation, 0 to 0.99."),
    ] = 0.0,
    workers: TrainWorkersOption = None,
    jobs: JobsAlias = None,
    device: DeviceOption = "auto",
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", metavar="", help="No progress bars: one plain log line per epoch."
        ),
    ] = False,
) -> None:
    """Train a ViT on an image folder, from scratch or by fine-tuning; resumable.

    Writes OUT/last.safetensors and OUT/best.safetensors, OUT/state.pt (to --resume), \
OUT/metrics.jsonl, OUT/metrics.csv and OUT/config.json, and prints the best model's path on \
stdout; OUT itself is a model for --model elsewhere (its best epoch). Under torchrun it trains \
with DistributedDataParallel and only rank 0 writes. Ctrl-C keeps the last finished epoch.

    On a CPU, fine-tuning the bundled model (--model bundled) learns a new task in minutes; \
from scratch takes far longer, and the run says how long after its first steps.
    """
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # before torch loads: a step's activations are reused, not refaulted
    from ..services.train import TrainConfig
    from ..services.train import run as run_training

    config = TrainConfig(
        data=str(data) if data is not None else "",
        out=str(out) if out is not None else (str(resume) if resume is not None else ""),
        resume=str(resume) if resume is not None else "",
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        beta2=beta2,
        label_smoothing=label_smoothing,
        grad_clip=grad_clip,
        ema=ema,
        mixup=mixup,
        cutmix=cutmix,
        randaugment=randaugment,
        randaugment_magnitude=randaugment_magnitude,
        crop_scale=crop_scale,
        hflip=hflip,
        pos_embed=pos_embed.value,
        pool=pool.value,
        depth=depth,
        width=width,
        num_heads=heads,
        mlp_dim=mlp_dim,
        dropout=dropout,
        drop_path=drop_path,
        seed=seed,
        val=str(val) if val is not None else "",
        val_split=val_split,
        workers=workers if workers is not None else jobs,
        device=device,
        amp=amp.value,
        linear_probe=linear_probe,
    )
    not_main = os.environ.get("RANK", "0") not in ("", "0")
    from .train_progress import TrainRenderer

    renderer = TrainRenderer(quiet=quiet or not_main, silent=not_main)
    try:
        with renderer:
            result = run_training(config, on_progress=renderer)
    except KeyboardInterrupt:
        _interrupted(config, not_main)
    if not_main:
        return
    from ..console import err

    if result.nothing_to_do:
        err.print(
            terminal_safe(
                f"nothing left to do: the run in {result.out_dir} has finished its "
                f"{result.epochs_done} epochs; pass a larger --epochs to train on"
            ),
            markup=False,
            soft_wrap=True,
        )
    if result.best_metric is not None:
        err.print(
            f"best epoch {result.best_epoch}: {result.best_metric_name} {result.best_metric:.4f}",
            markup=False,
        )
    best = Path(result.out_dir) / "best.safetensors"
    model_path = best if best.exists() else Path(result.out_dir) / "last.safetensors"
    # The model path alone on stdout, unwrapped, for scripts: MODEL=$(vit train ...); as the
    # exact bytes of the file name, whatever its encoding.
    stdout = typer.get_binary_stream("stdout")
    stdout.write(os.fsencode(model_path) + b"\n")
    stdout.flush()


def _interrupted(config, not_main: bool) -> None:
    """Ctrl-C: say what is saved and how to go on; exit status 130 as shells expect."""
    from ..services.train import saved_epoch

    if not not_main:
        from ..console import err

        folder = config.resume or config.out
        done = saved_epoch(folder) if folder else 0
        epochs = f" --epochs {config.epochs}" if config.epochs is not None else ""
        if done:
            err.print(
                terminal_safe(
                    f"interrupted: epoch {done} is saved in {folder}; continue with: "
                    f"vit train --resume {shlex.quote(folder)}{epochs}"
                ),
                markup=False,
                soft_wrap=True,
            )
        else:
            err.print("interrupted before the first epoch ended: nothing was saved", markup=False)
    raise typer.Exit(130)


EXAMPLES = """\
[bold]Examples[/]

  vit train photos/ --out runs/p --model bundled --linear-probe -b 16 --lr 1e-2 --val-split 0.2
  vit train shapes/ --out runs/a --epochs 20 --val-split 0.1      [dim]# from scratch: a GPU job[/]
  vit train photos/ --out runs/ft --model google/vit-base-patch16-224 --epochs 3
  vit train photos/ --out runs/probe --model facebook/dinov2-small --linear-probe
  vit train --resume runs/a --epochs 40
  torchrun --nproc_per_node=2 -m vitcli train shapes/ --out runs/ddp
"""


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EXAMPLES)(train)
