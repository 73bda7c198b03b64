"""Evaluating a model on a labelled image folder: top-1, top-5, per-class accuracy, confusion.

Folder classes are matched to the model's labels by name, so a model whose label set is
larger than the folder's (ImageNet on a few of its classes) evaluates fine; predictions of
labels outside the folder's classes land in an "(other)" column of the confusion matrix.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.folder import class_label, relabel, scan_image_folder
from ..data.labelled import FolderDataset, ShardSampler, make_loader
from ..data.loader import normalize
from ..errors import DatasetError, InputError, OptionError
from ..fileio import atomic_write_bytes
from ..runtime import (
    BatchOptions,
    check_batch_size,
    resolve_device,
    resolve_dtype,
    resolve_workers,
)
from ..text import csv_text, json_bytes
from ..weights.format import ModelBundle
from .batchrun import ProgressCallback
from .finite import require_finite
from .int8 import check_int8_options, prepare_int8

OTHER = "(other)"


@dataclass(frozen=True)
class EvalOptions(BatchOptions):
    """Every option of `vit eval`, beside the shared BatchOptions."""

    data: str
    output: str = ""  # FILE.json or FILE.csv
    confusion_png: str = ""
    batch_size: int = field(default=64, kw_only=True)
    workers: int | None = field(default=None, kw_only=True)  # None: default_workers()
    int8: bool = False  # int8 Linear layers on the CPU (services/int8.py)
    fast_decode: bool = False  # opt-in JPEG draft decoding (not the home's pixels)


@dataclass
class ClassResult:
    label: str
    images: int  # decoded and evaluated
    correct: int
    top5_correct: int
    failed: int = 0  # files of this class that could not be decoded

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.images if self.images else None

    @property
    def top5(self) -> float | None:
        return self.top5_correct / self.images if self.images else None


@dataclass
class EvalResult:
    model: str
    data: str
    images: int  # images evaluated (failures excluded)
    top1: float
    top5: float
    classes: list[ClassResult]
    confusion: list[list[int]]  # rows: true class (folder order); columns: confusion_labels
    confusion_labels: list[str]  # folder classes, plus "(other)" when the model has more labels
    failures: list[str] = field(default_factory=list)
    # Top-1 model label index of each image in folder order (-1: not decoded).
    predictions: list[int] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    decode: str = "exact"  # "fast" with --fast-decode (JPEG draft decoding)

    @property
    def failed_classes(self) -> list[str]:
        """Classes none of whose images could be decoded: they have no accuracy at all."""
        return [c.label for c in self.classes if c.images == 0 and c.failed]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "data": self.data,
            "images": self.images,
            "failed_images": len(self.failures),
            "decode": self.decode,
            "top1": self.top1,
            "top5": self.top5,
            "per_class": [
                {
                    "label": c.label,
                    "images": c.images,
                    "failed": c.failed,
                    "correct": c.correct,
                    "accuracy": c.accuracy,
                    "top5": c.top5,
                }
                for c in self.classes
            ],
            "confusion": {
                "rows": [c.label for c in self.classes],
                "columns": self.confusion_labels,
                "matrix": self.confusion,
            },
            "failures": self.failures,
        }


def run(
    options: EvalOptions,
    on_progress: ProgressCallback | None = None,
    on_note: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> EvalResult:
    """Load the model, evaluate it on the folder, write the files asked for. Progress as
    every batch command reports it: on_progress(done, total)."""
    from ..weights.resolve import load_model

    check(options)
    output = Path(options.output) if options.output else None
    png = Path(options.confusion_png) if options.confusion_png else None
    if options.int8:
        check_int8_options(options.device, options.dtype)
    device = resolve_device(options.device)  # a bad --device fails before the model loads
    # and so does a dtype this machine cannot run (an int8 run is float32 on the CPU)
    dtype, warning = resolve_dtype(options.dtype, device)
    if warning and on_warning is not None:
        on_warning(warning)
    resolve_workers(options.workers)
    bundle = load_model(options.model)
    result = evaluate(
        options.data,
        bundle,
        batch_size=options.batch_size,
        workers=options.workers,
        device=options.device,
        on_progress=on_progress,
        on_warning=on_warning,
        dtype=dtype,
        fast_decode=options.fast_decode,
        int8=options.int8,
        on_note=on_note,
    )
    from .confusion import confusion_png  # Pillow drawing, only when a picture is asked for

    for path, write in ((output, write_report), (png, confusion_png)):
        if path is None:
            continue
        try:
            result.written.append(write(result, path))
        except OSError as error:
            raise InputError(
                f"{path}: cannot write ({error.strerror or error}); "
                "choose a writable place with free space"
            ) from None
    return result


def check(options: EvalOptions) -> None:
    if options.output and Path(options.output).suffix.lower() not in (".json", ".csv"):
        raise OptionError(f"--output {options.output}: use a .json or .csv file name")
    if options.confusion_png and Path(options.confusion_png).suffix.lower() != ".png":
        raise OptionError(f"--confusion-png {options.confusion_png}: use a .png file name")


def evaluate(
    data_dir: str | Path,
    bundle: ModelBundle,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | torch.device = "auto",
    on_progress: ProgressCallback | None = None,
    dtype: torch.dtype = torch.float32,
    fast_decode: bool = False,
    int8: bool = False,
    on_note: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> EvalResult:
    """Run the model over every image of an ImageFolder tree with the model's own preprocessing
    (in `dtype`: float32, or bfloat16 where runtime.resolve_dtype allows it)."""
    check_batch_size(batch_size)

    def warn(message: str) -> None:
        if on_warning is not None:
            on_warning(message)

    workers, warning = resolve_workers(workers)
    if warning:
        warn(warning)
    folder = scan_image_folder(data_dir, min_classes=1)
    for message in folder.skipped:
        warn(message)
    labels = [class_label(name) for name in bundle.labels]
    missing = [name for name in folder.classes if name not in labels]
    if missing:
        raise DatasetError(
            f"{data_dir}: class folder(s) {', '.join(missing[:5])} are not labels of the model "
            f"({', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}); "
            "name the class folders after the model's labels"
        )
    # Dataset indices are model label indices from here on.
    data = relabel(folder, labels, what="evaluation")
    if isinstance(device, torch.device):
        device = str(device)
    # The one int8 decision: --int8, or an int8 file, runs on the CPU.
    target = resolve_device(prepare_int8(bundle, int8, device, command="eval", on_note=on_note))
    model = bundle.model.to(target).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    dataset = FolderDataset(data, bundle.preprocess, draft=fast_decode)
    loader = make_loader(dataset, ShardSampler(len(dataset)), batch_size, workers)

    folder_index = {labels.index(name): row for row, name in enumerate(folder.classes)}
    extra_column = len(labels) > len(folder.classes)
    columns = list(folder.classes) + ([OTHER] if extra_column else [])
    confusion = [[0] * len(columns) for _ in folder.classes]
    per_class = [ClassResult(name, 0, 0, 0) for name in folder.classes]
    failures: list[str] = []
    predictions = [-1] * len(dataset)
    done = 0
    k = min(5, len(labels))
    with torch.inference_mode():
        for batch in loader:
            for index, message in batch.failures:
                failures.append(message)
                per_class[folder_index[data.samples[index][1]]].failed += 1
                warn(f"skipped unreadable image: {message}")
            if len(batch):
                pixels = normalize(batch.pixel_tensor(), bundle.preprocess, target, dtype)
                logits = model(pixels).float()
                require_finite(logits, "the model output", bundle.reference)
                top = logits.topk(k, dim=1).indices.cpu()  # B,k
                for index, true, ranked in zip(batch.indices, batch.labels.tolist(), top.tolist()):
                    predictions[index] = ranked[0]
                    row = folder_index[true]
                    result = per_class[row]
                    result.images += 1
                    result.correct += int(ranked[0] == true)
                    result.top5_correct += int(true in ranked)
                    column = folder_index.get(ranked[0], len(columns) - 1)
                    confusion[row][column] += 1
            done += len(batch.indices) + len(batch.failures)
            if on_progress is not None:
                on_progress(done, len(dataset))
    images = sum(c.images for c in per_class)
    if images == 0:
        raise DatasetError(f"{data_dir}: none of the {len(dataset)} images could be decoded")
    return EvalResult(
        model=bundle.reference,
        data=str(data_dir),
        images=images,
        top1=sum(c.correct for c in per_class) / images,
        top5=sum(c.top5_correct for c in per_class) / images,
        classes=per_class,
        confusion=confusion,
        confusion_labels=columns,
        failures=failures,
        predictions=predictions,
        decode="fast" if fast_decode else "exact",
    )


def write_report(result: EvalResult, path: str | Path) -> Path:
    """JSON (everything) or CSV (one row per class plus an "(all)" row), chosen by extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        atomic_write_bytes(path, json_bytes(result.to_dict()))
    elif suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["class", "images", "failed", "correct", "accuracy", "top5"])
        for c in result.classes:
            writer.writerow(
                [csv_text(c.label), c.images, c.failed, c.correct, _fmt(c.accuracy), _fmt(c.top5)]
            )
        correct = sum(c.correct for c in result.classes)
        writer.writerow(
            [
                "(all)",
                result.images,
                len(result.failures),
                correct,
                _fmt(result.top1),
                _fmt(result.top5),
            ]
        )
        atomic_write_bytes(path, buffer.getvalue().encode("utf-8", "backslashreplace"))
    else:
        raise OptionError(f"--output {path}: use a .json or .csv file name")
    return path


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"
