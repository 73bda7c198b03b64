"""`vit train`'s progress on the terminal: a rich progress bar per epoch, a table row (or a
plain log line with --quiet) per finished epoch, warnings as they come, and for a from-scratch
run on the CPU how long it will take and what is faster."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..text import terminal_safe

if TYPE_CHECKING:
    from rich.progress import TaskID


# Steps timed before a from-scratch CPU run says how long it will take.
ESTIMATE_AFTER_STEPS = 3


class TrainRenderer:
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
        self.task: TaskID | None = None
        self.rows_printed = 0
        self.estimate: dict | None = None  # a scratch CPU run's sizes, until its estimate is out

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, event) -> None:
        if self.silent and event.kind != "warning":
            return
        if event.kind == "start":
            self._start(event)
        elif event.kind == "warning":
            from ..console import print_warning

            print_warning(event.message)
        elif event.kind == "step":
            m = event.metrics
            if self.task is None:
                self.task = self.progress.add_task(
                    f"epoch {event.epoch}/{event.epochs}", total=event.steps, rate="", stats=""
                )
            if self.estimate is not None:
                self._estimate(event)
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

    def _start(self, event) -> None:
        info = event.metrics
        resumed = (
            f", resumed after epoch {info['resumed_at_epoch']}"
            if info["resumed_at_epoch"] is not None
            else ""
        )
        device = (
            info["device"]
            + (f", {info['amp']}" if info.get("amp") else " bf16" if info["bf16"] else "")
            + (f" x{info['world_size']}" if info["world_size"] > 1 else "")
        )
        line = (
            f"{info['mode']} {info['model']} ({info['parameters'] / 1e6:.2f}M params), "
            f"{len(info['classes'])} classes, {info['train_images']} train / "
            f"{info['val_images']} val images, {event.steps} steps/epoch, lr {info['lr']:g}, "
            f"{device}, {info['workers']} workers{resumed} -> {info['out']}"
        )
        self.err.print(terminal_safe(line), soft_wrap=True, markup=False)
        for note in info["notes"]:
            self.err.print(terminal_safe(f"note: {note}"), soft_wrap=True, markup=False)
        if info["mode"] == "scratch" and info["device"].startswith("cpu"):
            done = info["resumed_at_epoch"] or 0
            self.estimate = {"images": info["train_images"], "epochs": event.epochs - done}

    def _estimate(self, event) -> None:
        """After a few steps (or a short epoch's end): the whole run at the measured rate, and
        the faster path. Validation and the first decode are not in it: "about"."""
        assert self.estimate is not None
        started = self.estimate.setdefault("started", time.perf_counter())
        steps = event.step
        if (
            steps < ESTIMATE_AFTER_STEPS
            and steps < event.steps
            and time.perf_counter() - started < 20
        ):
            return
        rate = event.metrics["images_per_s"]
        images, epochs = self.estimate["images"], self.estimate["epochs"]
        self.estimate = None
        if not rate:
            return
        minutes = images * epochs / rate / 60
        took = f"{minutes:.0f} min" if minutes >= 1.5 else f"{minutes * 60:.0f} s"
        self.progress.console.print(
            f"note: from scratch on the CPU at {rate:.1f} img/s this run takes about {took} "
            f"({epochs} epochs of {images} images); fine-tuning the bundled model learns a new "
            "task in minutes: --model bundled (docs/train.md)",
            soft_wrap=not self.progress.console.is_terminal,
            markup=False,
            highlight=False,
        )

    def _print_row(self, event) -> None:
        m = event.metrics

        def f(value, spec: str) -> str:
            return "-" if value is None else format(value, spec)

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
