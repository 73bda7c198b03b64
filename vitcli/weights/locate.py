"""Where a `--model` reference points, told without torch: the bundled model's file, a
`vit train` run folder's model, a `family:FILE` name, what kind of path it is.

resolve.py loads what these name; peek.py reads a checkpoint's preprocessing through them
before torch is imported.
"""

from __future__ import annotations

import json
import os
import re
import stat
from importlib import resources
from pathlib import Path

from ..errors import ModelNotFoundError, VitError
from .files import safetensors_metadata

DEFAULT_MODEL_NAME = "vit-shapes-p16.safetensors"
BUNDLED_NAME = "vit-shapes-p16"
# Names that always mean the bundled model (a local folder of that name: write ./bundled).
BUNDLED_NAMES = ("bundled", BUNDLED_NAME, "default")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def default_model_path() -> Path:
    """The bundled model: inside the installed package, else the checkout's weights/ folder."""
    try:
        candidate = resources.files("vitcli.bundled") / DEFAULT_MODEL_NAME
        if candidate.is_file():
            return Path(str(candidate))
    except (ModuleNotFoundError, TypeError):
        pass
    checkout = Path(__file__).resolve().parents[2] / "weights" / DEFAULT_MODEL_NAME
    if checkout.is_file():
        return checkout
    raise ModelNotFoundError(
        "the bundled default model is missing from this installation; reinstall vitcli, "
        "or pass --model with a model file, folder or hub id"
    )


def named_family(text: str) -> tuple[str, str | None, str] | None:
    """`dino:FILE`, `dinov2:FILE` or `timm:ARCH:FILE`: a raw state dict whose family (and
    architecture) the user names, when its tensors cannot tell. None for anything else."""
    head, _, rest = text.partition(":")
    if head in ("dino", "dinov2") and rest:
        return head, None, rest
    if head == "timm" and rest:
        arch, _, file = rest.partition(":")
        if not arch or not file:
            raise ModelNotFoundError(
                f"--model {text}: write timm:ARCH:FILE, e.g. timm:vit_small_patch16_224:w.pth"
            )
        return "timm", arch, file
    return None


def path_kind(path: Path) -> str:
    """ "file", "folder", "other" (FIFO, device, socket) or "missing", from stat() alone."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a broken link, a name too long, a NUL byte
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "other"


# -- `vit train --out` folders -------------------------------------------------------------------
# The names services/train/rundir.py writes (weights/ sits below services/, so they are
# repeated here; tests/test_run_folder_model.py holds the two lists equal).
RUN_BEST = "best.safetensors"
RUN_LAST = "last.safetensors"
RUN_STATE = "state.pt"
RUN_METRICS = "metrics.jsonl"
_RUN_EPOCH = re.compile(r"epoch (\d+)$")
_METRIC_WORDS = {"val_top1": "validation top-1", "train_loss": "train loss"}


def is_run_folder(path: str | Path) -> bool:
    """A `vit train --out` folder: a model file of the run beside its state or metrics."""
    path = Path(path)
    has_model = (path / RUN_BEST).is_file() or (path / RUN_LAST).is_file()
    return has_model and ((path / RUN_STATE).is_file() or (path / RUN_METRICS).is_file())


def run_folder_model(path: str | Path) -> tuple[Path, str] | None:
    """(the model file, a line saying which one and why) for a run folder, else None: the best
    epoch's model, or the last epoch's where no best was written. Reads the file's header and
    metrics.jsonl only."""
    path = Path(path)
    if not is_run_folder(path):
        return None
    chosen = path / RUN_BEST if (path / RUN_BEST).is_file() else path / RUN_LAST
    epoch = _run_epoch(chosen)
    row = _metrics_row(path / RUN_METRICS, epoch) if epoch is not None else None
    facts = []
    for key in ("val_top1", "train_loss"):  # what picked the best epoch (rundir.py)
        value = row.get(key) if row else None
        if isinstance(value, (int, float)):
            best = "best " if chosen.name == RUN_BEST else ""
            facts.append(f"{best}{_METRIC_WORDS[key]} {value:.3f}")
            break
    if epoch is not None:
        facts.append(f"epoch {epoch}")
    return chosen, f"using {chosen}" + (f" ({', '.join(facts)})" if facts else "")


def _run_epoch(model_file: Path) -> int | None:
    """The epoch a run's model file holds (its source metadata ends "epoch N")."""
    try:
        metadata = safetensors_metadata(model_file)
    except VitError:
        return None
    match = _RUN_EPOCH.search(metadata.get("source", ""))
    return int(match.group(1)) if match else None


def _metrics_row(metrics: Path, epoch: int) -> dict | None:
    if not metrics.is_file():  # never open a FIFO named like the metrics
        return None
    try:
        with open(metrics, encoding="utf-8") as handle:
            lines = handle.read(10_000_000).splitlines()
    except (OSError, ValueError):
        return None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("epoch") == epoch:
            return row
    return None
