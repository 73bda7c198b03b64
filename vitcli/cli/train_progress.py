"""`vit train`'s progress on the terminal: a rich progress bar per epoch, a table row (or a
plain log line with --quiet) per finished epoch, warnings as they come."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..text import terminal_safe

if TYPE_CHECKING:
    from rich.progress import TaskID


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
            + (" bf16" if info["bf16"] else "")
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
