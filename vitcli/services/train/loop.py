"""The training loop: per epoch, the steps, the validation, the checkpoint.

One file a little over 400 lines on purpose, in the nanoGPT spirit: the loop is read top to
bottom, and splitting the step from the epoch would hide the determinism rules below.

Determinism: data order comes from (seed, epoch) (DistributedSampler), each sample's
augmentation from (seed, epoch, index), mixup from (seed, epoch, step), and the global torch RNG
(dropout, drop-path) is reseeded from (seed, epoch) at the start of every epoch. A run resumed
from the end of epoch k therefore replays epochs k+1... exactly as the uninterrupted run did.
Batches arrive as uint8 from the decoding workers and are normalised on the device by
data.loader.normalize, the one normalisation every command uses.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ... import distributed
from ...data.augment import mix_batch
from ...data.labelled import LabelledBatch
from ...data.loader import normalize
from ...data.preprocess import Preprocess
from ...errors import TrainingError
from ...model import ViT
from ...weights.format import save_model
from .config import ResolvedConfig
from .rundir import (
    BEST_FILE,
    LAST_FILE,
    STATE_FILE,
    RunFolder,
    bytes_writer,
    metrics_csv,
    metrics_jsonl,
    rng_state,
    state_bytes,
)
from .setup import EMA, Loaders, cpu_state_dict, seed_from
from .targets import hits


@dataclass
class TrainEvent:
    """What the trainer tells its callback (rank 0 only, except warnings)."""

    kind: str  # "start" | "step" | "epoch" | "warning"
    epoch: int = 0  # 1-based
    epochs: int = 0
    step: int = 0  # step inside the epoch, 1-based
    steps: int = 0  # steps per epoch
    metrics: dict = field(default_factory=dict)
    message: str = ""


Callback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    best_epoch: int
    best_metric: float | None
    best_metric_name: str
    history: list[dict]
    stopped_early: bool = False
    nothing_to_do: bool = False  # a resumed run that had already finished its epochs


# -- schedule and step ------------------------------------------------------------------------
def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Linear warmup to `base_lr` over `warmup_steps`, then cosine down to `min_lr` (per step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(
    net: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.1,
    grad_clip: float = 1.0,
    use_bf16: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, loss, backward and gradient clipping of one batch; returns (loss, grad norm,
    logits). The caller checks the norm and then calls `optimizer.step()`.

    `net` may be the DDP wrapper of `model`; `targets` are class indices or (B, K)
    probabilities (mixup); `scale` 0 turns a dummy batch into a no-op that still joins
    DDP's gradient all-reduce.
    """
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = net(pixels)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    if scale != 1.0:
        loss = loss * scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # The norm of the all-reduced gradients is the same on every rank, so all ranks agree
    # to stop on a NaN/inf without an extra collective.
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    return loss.detach(), norm, logits.detach()


@dataclass
class Run:
    """Everything an epoch needs, set up once by service.run."""

    config: ResolvedConfig
    folder: RunFolder
    model: ViT
    net: torch.nn.Module  # the model or its DDP wrapper
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    preprocess: Preprocess
    classes: list[str]
    source: str
    device: torch.device
    use_bf16: bool
    rank: int
    world: int
    steps_per_epoch: int
    warmup_steps: int
    total_steps: int
    emit: Callback
    best_name: str  # "val_top1" (higher is better) or "train_loss" (lower is better)
    features: bool = False  # the loader yields cached head inputs (linear probe), not pixels
    # (K + G, K) target distribution of every label, on the device, when the data has
    # multi-class folders (targets.label_targets); None otherwise.
    label_targets: torch.Tensor | None = None
    step: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    reported: set[tuple[str, int]] = field(default_factory=set)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def saved_model(self) -> ViT:
        return self.ema.model if self.ema is not None else self.model

    def report_failures(self, batch: LabelledBatch, split: str) -> int:
        for index, message in batch.failures:
            if (split, index) not in self.reported:
                self.reported.add((split, index))
                self.emit(TrainEvent("warning", message=f"skipped unreadable image: {message}"))
        return len(batch.failures)


def train_epochs(
    run: Run, loaders: Loaders, start_epoch: int, stop_after_epoch: int | None
) -> bool:
    """Epochs start_epoch+1 .. config.epochs; returns True when stopped early."""
    for epoch in range(start_epoch, run.config.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return True
        started = time.perf_counter()
        row = train_one_epoch(run, loaders.train, loaders.sampler, epoch)
        if loaders.val is not None:
            row.update(validate(run, loaders.val))
        row["epoch_time_s"] = time.perf_counter() - started
        if row["train_loss"] is None:
            raise_no_images(run, epoch)
        metric = row[run.best_name]
        improved = is_better(run, metric)
        if improved:
            run.best_metric, run.best_epoch = metric, epoch + 1
        run.history.append(row)
        if run.main:
            checkpoint(run, epoch + 1, improved)
        run.emit(
            TrainEvent(
                "epoch",
                epoch=epoch + 1,
                epochs=run.config.epochs,
                steps=run.steps_per_epoch,
                metrics={
                    **row,
                    "best": improved,
                    "best_metric": run.best_metric,
                    "best_epoch": run.best_epoch,
                },
            )
        )
    return False


def is_better(run: Run, metric: float | None) -> bool:
    """Val top-1 higher, or (without validation) train loss lower, than the best so far."""
    if metric is None:
        return False
    if run.best_metric is None:
        return True
    if run.best_name == "val_top1":
        return metric > run.best_metric
    return metric < run.best_metric


def raise_no_images(run: Run, epoch: int) -> None:
    raise TrainingError(
        f"{run.config.data}: no image of epoch {epoch + 1} could be decoded; check the files"
    )


def train_one_epoch(run: Run, loader, sampler, epoch: int) -> dict:
    config = run.config
    torch.manual_seed(seed_from("epoch", config.seed, epoch, run.rank))  # dropout / drop-path
    sampler.set_epoch(epoch)
    run.net.train()
    num_classes = len(run.classes)
    mixing = config.mixup > 0 or config.cutmix > 0
    loss_sum, correct, seen, skipped = 0.0, 0, 0, 0
    started = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    for step_in_epoch, batch in enumerate(loader):
        skipped += run.report_failures(batch, "train")
        lr = lr_at(run.step, config.lr, run.warmup_steps, run.total_steps, config.min_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        empty = len(batch) == 0
        if empty and run.world == 1:
            run.step += 1
            continue
        if empty:  # every image of this rank's batch failed: keep DDP's collectives in step
            shape = tuple(batch.pixel_tensor().shape[1:]) if run.features else None
            pixels = torch.zeros((1, *(shape or (3, *run.preprocess.size))), device=run.device)
            labels = torch.zeros(1, dtype=torch.int64, device=run.device)
        elif run.features:
            pixels = batch.pixel_tensor()  # B,F: cached head inputs, already on the device
            labels = batch.label_tensor()
        else:
            pixels = normalize(batch.pixel_tensor(), run.preprocess, run.device)  # B,C,H,W
            labels = batch.label_tensor().to(run.device, non_blocking=True)
        table = run.label_targets
        targets = labels if table is None else table[labels]  # (B,) or B,K
        if mixing:
            pixels, targets = mix_batch(
                pixels,
                F.one_hot(labels, num_classes).float() if table is None else targets,
                config.mixup,
                config.cutmix,
                random.Random(f"mix:{config.seed}:{epoch}:{step_in_epoch}:{run.rank}"),
            )
        loss, norm, logits = train_step(
            run.net,
            run.model,
            run.optimizer,
            pixels,
            targets,
            label_smoothing=config.label_smoothing,
            grad_clip=config.grad_clip,
            use_bf16=run.use_bf16,
            scale=0.0 if empty else 1.0,
        )
        loss_value = float(loss.item())
        if not (math.isfinite(loss_value) and math.isfinite(float(norm))):
            raise_not_finite(run, epoch, step_in_epoch, lr, loss_value)
        run.optimizer.step()  # after the finiteness check: a NaN step never reaches the weights
        if run.ema is not None:
            run.ema.update(run.model)
        run.step += 1
        if not empty:
            loss_sum += loss_value * labels.shape[0]
            correct += hits(logits, labels, 1, table)
            seen += labels.shape[0]
        elapsed = time.perf_counter() - started
        run.emit(
            TrainEvent(
                "step",
                epoch=epoch + 1,
                epochs=config.epochs,
                step=step_in_epoch + 1,
                steps=run.steps_per_epoch,
                metrics={
                    "loss": loss_sum / max(seen, 1),
                    "top1": correct / max(seen, 1),
                    "lr": lr,
                    "images_per_s": seen * run.world / elapsed if elapsed > 0 else 0.0,
                },
            )
        )
    train_time = time.perf_counter() - started
    loss_sum, correct, seen, skipped = all_reduce_sum([loss_sum, correct, seen, skipped], run)
    train_time = all_reduce_max(train_time, run)
    return {
        "epoch": epoch + 1,
        "step": run.step,
        "lr": lr,
        "train_loss": loss_sum / seen if seen else None,
        "train_top1": correct / seen if seen else None,
        "val_loss": None,
        "val_top1": None,
        "val_top5": None,
        "images_per_s": seen / train_time if train_time > 0 else None,
        "epoch_time_s": None,
        "train_images": int(seen),
        "skipped_images": int(skipped),
    }


def raise_not_finite(run: Run, epoch: int, step: int, lr: float, loss: float) -> None:
    last_good = (
        f"the last good checkpoint (epoch {epoch}) is kept in {run.folder}"
        if epoch > 0
        else "no checkpoint was written yet"
    )
    what = "the loss" if not math.isfinite(loss) else "the gradients"
    raise TrainingError(
        f"{what} became NaN/inf at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); "
        f"{last_good}; lower --lr or keep --grad-clip on, and start a new run"
    )


@torch.no_grad()
def validate(run: Run, loader) -> dict:
    model = run.saved_model
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    for batch in loader:
        run.report_failures(batch, "val")
        if len(batch) == 0:
            continue
        pixels = normalize(batch.pixel_tensor(), run.preprocess, run.device)  # B,C,H,W
        labels = batch.label_tensor().to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            logits = model(pixels)
        logits = logits.float()
        table = run.label_targets
        targets = labels if table is None else table[labels]
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum").item())
        top1 += hits(logits, labels, 1, table)
        top5 += hits(logits, labels, 5, table)
        seen += labels.shape[0]
    model.train(was_training)
    loss_sum, top1, top5, seen = all_reduce_sum([loss_sum, top1, top5, seen], run)
    if not seen:
        return {"val_loss": None, "val_top1": None, "val_top5": None}
    return {"val_loss": loss_sum / seen, "val_top1": top1 / seen, "val_top5": top5 / seen}


def checkpoint(run: Run, epoch: int, improved: bool) -> None:
    """Commit the epoch's files in the run folder's order (state.pt last; see rundir)."""
    writers = [
        ("metrics.jsonl", bytes_writer(metrics_jsonl(run.history))),
        ("metrics.csv", bytes_writer(metrics_csv(run.history))),
        (LAST_FILE, model_writer(run, epoch)),
    ]
    if improved:
        writers.append((BEST_FILE, model_writer(run, epoch)))
    writers.append((STATE_FILE, bytes_writer(state_bytes(training_state(run, epoch)))))
    run.folder.commit(epoch, writers, saved_epoch=epoch - 1)


def model_writer(run: Run, epoch: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        save_model(
            run.saved_model,
            path,
            labels=run.classes,
            preprocess=run.preprocess,
            source=f"{run.source}, epoch {epoch}",
        )

    return write


def training_state(run: Run, epoch: int) -> dict:
    config = run.config
    return {
        "epoch": epoch,
        "step": run.step,
        "classes": list(run.classes),
        "model": cpu_state_dict(run.model),
        "ema": cpu_state_dict(run.ema.model) if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "bf16": run.use_bf16,  # --amp auto's choice, kept so that a resume trains the same way
        "scheduler": {
            "name": "warmup_cosine",
            "base_lr": config.lr,
            "min_lr": config.min_lr,
            "warmup_steps": run.warmup_steps,
            "total_steps": run.total_steps,
            "step": run.step,
        },
        "rng": rng_state(),
        "best_metric": run.best_metric,
        "best_epoch": run.best_epoch,
        "best_metric_name": run.best_name,
    }


def all_reduce_sum(values: list, run: Run) -> list:
    if not distributed.is_distributed():
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: float, run: Run) -> float:
    if not distributed.is_distributed():
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
