"""`vit train` and `vit eval`: parse options, call the service, render progress and results."""

from __future__ import annotations

import os
from pathlib import Path

import typer

_SCRATCH = "From scratch only"
_OPT = "Optimisation"
_AUG = "Augmentation"


def train(
    data: Path | None = typer.Argument(
        None, help="Training folder: one subfolder of images per class (optional with --resume)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder for checkpoints, metrics and config."
    ),
    model: str = typer.Option(
        "Ti/16",
        "--model",
        "-m",
        help="A variant to train from scratch (Ti/16, S/16, B/16, ...) or a model to fine-tune (file, folder, hub id).",
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Epochs (default: 30 scratch, 10 fine-tune)."
    ),
    batch_size: int = typer.Option(
        64, "--batch-size", "-b", min=1, help="Images per step (per process)."
    ),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        min=8,
        help="Input side (default: 224 scratch, the model's own when fine-tuning).",
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Peak learning rate (default: 1e-3 scratch, 1e-4 fine-tune).",
        rich_help_panel=_OPT,
    ),
    min_lr: float = typer.Option(
        1e-6, "--min-lr", help="Learning rate at the end of the cosine.", rich_help_panel=_OPT
    ),
    weight_decay: float | None = typer.Option(
        None,
        "--weight-decay",
        help="AdamW decoupled weight decay, not on biases/norms/pos_embed/cls (default: 0.05).",
        rich_help_panel=_OPT,
    ),
    warmup_epochs: float | None = typer.Option(
        None,
        "--warmup-epochs",
        help="Linear warmup length (default: min(5, 10% of epochs) scratch, 10% fine-tune).",
        rich_help_panel=_OPT,
    ),
    label_smoothing: float = typer.Option(
        0.1, "--label-smoothing", help="Label smoothing of the cross-entropy.", rich_help_panel=_OPT
    ),
    grad_clip: float = typer.Option(
        1.0,
        "--grad-clip",
        help="Clip the global gradient norm to this; 0 turns it off.",
        rich_help_panel=_OPT,
    ),
    ema: float = typer.Option(
        0.0,
        "--ema",
        help="Keep an EMA of the weights with this decay per step (e.g. 0.999) and save it; 0 = off.",
        rich_help_panel=_OPT,
    ),
    amp: str = typer.Option(
        "auto",
        "--amp",
        help="auto: bf16 autocast on CUDA GPUs that support it (never on CPU); off: fp32.",
        rich_help_panel=_OPT,
    ),
    crop_scale: float | None = typer.Option(
        None,
        "--crop-scale",
        help="Smallest area of the random resized crop (default: 0.35 scratch, 0.5 fine-tune).",
        rich_help_panel=_AUG,
    ),
    hflip: bool = typer.Option(
        True, "--hflip/--no-hflip", help="Random horizontal flips.", rich_help_panel=_AUG
    ),
    randaugment: int = typer.Option(
        0,
        "--randaugment",
        min=0,
        help="RandAugment-like ops per image; 0 = off (try 2).",
        rich_help_panel=_AUG,
    ),
    randaugment_magnitude: int = typer.Option(
        9,
        "--randaugment-magnitude",
        min=0,
        max=10,
        help="RandAugment magnitude, 0..10.",
        rich_help_panel=_AUG,
    ),
    mixup: float = typer.Option(
        0.0, "--mixup", min=0.0, help="Mixup alpha; 0 = off (try 0.8).", rich_help_panel=_AUG
    ),
    cutmix: float = typer.Option(
        0.0,
        "--cutmix",
        min=0.0,
        help="Cutmix alpha; 0 = off (try 1.0). With mixup, one of the two per batch.",
        rich_help_panel=_AUG,
    ),
    pos_embed: str = typer.Option(
        "learned", "--pos-embed", help="learned or sincos2d (fixed).", rich_help_panel=_SCRATCH
    ),
    pool: str = typer.Option(
        "cls",
        "--pool",
        help="cls (read the CLS token) or mean (average the patch tokens).",
        rich_help_panel=_SCRATCH,
    ),
    depth: int | None = typer.Option(
        None,
        "--depth",
        min=1,
        help="Override the variant's number of blocks.",
        rich_help_panel=_SCRATCH,
    ),
    width: int | None = typer.Option(
        None, "--width", min=1, help="Override the variant's width D.", rich_help_panel=_SCRATCH
    ),
    heads: int | None = typer.Option(
        None,
        "--heads",
        "--num-heads",
        min=1,
        help="Override the variant's number of heads.",
        rich_help_panel=_SCRATCH,
    ),
    mlp_dim: int | None = typer.Option(
        None, "--mlp-dim", min=1, help="Override the variant's MLP size.", rich_help_panel=_SCRATCH
    ),
    dropout: float = typer.Option(
        0.0, "--dropout", min=0.0, max=0.9, help="Dropout after attention/MLP projections."
    ),
    drop_path: float = typer.Option(
        0.0, "--drop-path", min=0.0, max=0.9, help="Stochastic depth rate of the last block."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of initialisation, data order, augmentation and split."
    ),
    val: Path | None = typer.Option(
        None, "--val", help="Validation folder (same class subfolders)."
    ),
    val_split: float = typer.Option(
        0.0,
        "--val-split",
        min=0.0,
        max=0.99,
        help="Hold out this fraction of each class for validation.",
    ),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue the run saved in this folder, up to --epochs."
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-j", min=0, help="Decoding processes (default: min(4, cores/2))."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bars: one plain log line per epoch."
    ),
) -> None:
    """Train a ViT on an image folder, from scratch or by fine-tuning; resumable.

    Writes OUT/last.safetensors and OUT/best.safetensors (ready for `vit predict --model`),
    OUT/state.pt (to --resume), OUT/metrics.jsonl, OUT/metrics.csv and OUT/config.json.
    Under torchrun it trains with DistributedDataParallel and only rank 0 writes.
    """
    from ..errors import InputError
    from ..services.train import TrainConfig
    from ..services.train import train as run_training

    if resume is None and data is None:
        raise InputError(
            "pass DATA (a folder with one subfolder per class), or --resume DIR to continue a run"
        )
    if resume is None and out is None:
        raise InputError("pass --out DIR: the folder for checkpoints and metrics")
    if resume is not None and out is not None and Path(out).resolve() != Path(resume).resolve():
        raise InputError(
            "--resume continues the run in its own folder; drop --out or pass the same folder"
        )
    if val is not None and val_split > 0:
        raise InputError("pass either --val DIR or --val-split F, not both")
    config = TrainConfig(
        data=str(data) if data is not None else "",
        out=str(resume if resume is not None else out),
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        grad_clip=grad_clip,
        ema=ema,
        mixup=mixup,
        cutmix=cutmix,
        randaugment=randaugment,
        randaugment_magnitude=randaugment_magnitude,
        crop_scale=crop_scale,
        hflip=hflip,
        pos_embed=pos_embed,
        pool=pool,
        depth=depth,
        width=width,
        num_heads=heads,
        mlp_dim=mlp_dim,
        dropout=dropout,
        drop_path=drop_path,
        seed=seed,
        val=str(val) if val is not None else None,
        val_split=val_split,
        workers=workers,
        device=device,
        amp=amp,
    )
    not_main = os.environ.get("RANK", "0") not in ("", "0")
    if resume is not None and not not_main:
        _warn_ignored_on_resume(config, Path(resume))
    renderer = _TrainRenderer(quiet=quiet or not_main, silent=not_main)
    with renderer:
        result = run_training(config, callback=renderer, resume=resume is not None)
    if not not_main:
        from ..console import err

        best = Path(result.out_dir) / "best.safetensors"
        if result.best_metric is not None:
            err.print(
                f"best epoch {result.best_epoch}: {result.best_metric_name} {result.best_metric:.4f}"
            )
        # The model path alone on stdout, unwrapped, for scripts: MODEL=$(vit train ...)
        typer.echo(str(best) if best.exists() else str(Path(result.out_dir) / "last.safetensors"))


def _warn_ignored_on_resume(config, run: Path) -> None:
    """A resumed run keeps its saved settings: say so for any option given with another value."""
    import json
    from dataclasses import fields

    from ..console import print_warning
    from ..services.train import TrainConfig

    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return  # the service reports a missing or broken run folder
    defaults = TrainConfig()
    ignored = []
    for item in fields(TrainConfig):
        name = item.name
        given = getattr(config, name)
        if name in ("data", "out", "epochs", "workers", "device") or given == getattr(
            defaults, name
        ):
            continue
        if name in ("val", "model") and given and Path(given).exists():
            given = str(Path(given).resolve())
        if given != saved.get(name):
            ignored.append("--" + name.replace("_", "-"))
    if ignored:
        print_warning(
            f"ignored with --resume (the run keeps the settings in its config.json): {', '.join(ignored)}"
        )


class _TrainRenderer:
    """Binds TrainEvents to a rich progress bar per epoch and a summary row per epoch."""

    _COLUMNS = (
        "epoch",
        "train loss",
        "train acc",
        "val loss",
        "val top-1",
        "val top-5",
        "lr",
        "img/s",
        "time",
    )
    _KEYS = (
        "epoch",
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "lr",
        "images_per_s",
        "time",
    )

    def __init__(self, quiet: bool, silent: bool = False) -> None:
        from rich.progress import TextColumn

        from ..console import err, make_progress

        self.quiet, self.silent, self.err = quiet, silent, err
        self.progress = make_progress(TextColumn("{task.fields[stats]}"), quiet=quiet)
        self.task = None
        self.rows_printed = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, event) -> None:
        if self.silent and event.kind != "warning":
            return
        from rich.markup import escape

        if event.kind == "start":
            info = event.metrics
            resumed = (
                f", resumed after epoch {info['resumed_at_epoch']}"
                if info["resumed_at_epoch"] is not None
                else ""
            )
            device = (
                info["device"]
                + (" bf16" if info["bf16"] else "")
                + (f" x{info['world_size']}" if info["world_size"] > 1 else "")
            )
            line = (
                f"{info['mode']} {info['model']} ({info['parameters'] / 1e6:.2f}M params), {len(info['classes'])} classes, "
                f"{info['train_images']} train / {info['val_images']} val images, {event.steps} steps/epoch, "
                f"lr {info['lr']:g}, {device}{resumed} -> {info['out']}"
            )
            self.err.print(escape(line), soft_wrap=True)
            for note in info["notes"]:
                self.err.print(escape(f"note: {note}"), soft_wrap=True)
        elif event.kind == "warning":
            from ..console import print_warning

            print_warning(event.message)
        elif event.kind == "step":
            m = event.metrics
            if self.task is None:
                self.task = self.progress.add_task(
                    f"epoch {event.epoch}/{event.epochs}", total=event.steps, rate="", stats=""
                )
            self.progress.update(
                self.task,
                completed=event.step,
                rate=f"{m['images_per_s']:.1f} img/s",
                stats=f"loss {m['loss']:.4f} acc {m['top1']:.3f} lr {m['lr']:.2e}",
            )
        elif event.kind == "epoch":
            if self.task is not None:
                self.progress.remove_task(self.task)  # the summary row replaces the finished bar
                self.task = None
            self._print_row(event)

    def _print_row(self, event) -> None:
        m = event.metrics
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        values = (
            f"{event.epoch}/{event.epochs}" + (" *" if m.get("best") else ""),
            f(m["train_loss"], ".4f"),
            f(m["train_top1"], ".3f"),
            f(m["val_loss"], ".4f"),
            f(m["val_top1"], ".3f"),
            f(m["val_top5"], ".3f"),
            f(m["lr"], ".2e"),
            f(m["images_per_s"], ".1f"),
            f(m["epoch_time_s"], ".1f") + "s",
        )
        if self.quiet:
            self.err.print(
                "epoch "
                + values[0]
                + " "
                + " ".join(f"{key}={value}" for key, value in zip(self._KEYS[1:], values[1:])),
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
            return
        from rich import box
        from rich.table import Table

        table = Table(
            box=box.SIMPLE_HEAD, show_header=self.rows_printed == 0, pad_edge=False, padding=(0, 1)
        )
        for name in self._COLUMNS:
            table.add_column(name, justify="right", width=10)
        table.add_row(*values)
        self.progress.console.print(table)
        self.rows_printed += 1


def evaluate(
    data: Path = typer.Argument(
        ..., help="Folder with one subfolder of images per class, named after the model's labels."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model file, folder or hub id (default: the bundled model)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the results to FILE.json or FILE.csv."
    ),
    confusion_png: Path | None = typer.Option(
        None, "--confusion-png", help="Save the confusion matrix as a PNG heat map."
    ),
    batch_size: int = typer.Option(
        64, "--batch-size", "-b", min=1, help="Images per forward pass."
    ),
    workers: int = typer.Option(2, "--workers", "-j", min=0, help="Decoding processes."),
    device: str | None = typer.Option(
        None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar, no table: the top-1/top-5 line only."
    ),
) -> None:
    """Evaluate a model on a labelled image folder: top-1, top-5, per-class accuracy, confusion matrix."""
    from ..console import err, make_progress, print_warning
    from ..console import out as stdout
    from ..errors import InputError
    from ..services.evaluate import confusion_png as write_png
    from ..services.evaluate import evaluate as run_eval
    from ..services.evaluate import write_report
    from ..weights.resolve import load_model

    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise InputError(f"--output {output}: use a .json or .csv file name")
    if confusion_png is not None and confusion_png.suffix.lower() != ".png":
        raise InputError(f"--confusion-png {confusion_png}: use a .png file name")
    bundle = load_model(model)
    with make_progress(quiet=quiet) as progress:
        task = progress.add_task("eval", total=None, rate="")
        result = run_eval(
            data,
            bundle,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            warn=print_warning,
        )
    if output is not None:
        write_report(result, output)
    if confusion_png is not None:
        write_png(result, confusion_png)
    summary = f"top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  ({result.images} images, {len(result.classes)} classes)"
    if quiet:
        stdout.print(summary, markup=False)
        return
    _render_eval(result, stdout)
    if result.failures:
        err.print(f"{len(result.failures)} unreadable images skipped")


def _render_eval(result, console) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"{result.model} on {result.data}", box=box.SIMPLE_HEAD)
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    for c in result.classes:
        table.add_row(
            c.label,
            str(c.images),
            "-" if c.accuracy is None else f"{c.accuracy:.3f}",
            "-" if c.top5 is None else f"{c.top5:.3f}",
        )
    table.add_section()
    table.add_row(
        "[bold]all", str(result.images), f"[bold]{result.top1:.3f}", f"[bold]{result.top5:.3f}"
    )
    console.print(table)
    if len(result.confusion_labels) <= 16:
        matrix = Table(title="confusion (rows: true, columns: predicted)", box=box.SIMPLE_HEAD)
        matrix.add_column("")
        for name in result.confusion_labels:
            matrix.add_column(name, justify="right")
        for c, row in zip(result.classes, result.confusion):
            matrix.add_row(
                c.label,
                *(
                    f"[bold]{v}" if i == result.classes.index(c) else str(v)
                    for i, v in enumerate(row)
                ),
            )
        console.print(matrix)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate)
