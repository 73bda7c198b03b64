"""The run folder of `vit train`: what it holds, the order its files are committed in, and
how a run is picked up again.

  config.json          the resolved configuration (every option, defaults filled in), the
                       classes, the model and preprocessing: the run's manifest
  last.safetensors     the model after the last completed epoch (our format)
  best.safetensors     the model of the best epoch (val top-1, or train loss without validation)
  state.pt             model, EMA, optimizer, RNG states, epoch, step, best metric; tensors,
                       dicts, lists, numbers and strings only: torch.load(weights_only=True)
  metrics.jsonl/.csv   one row per epoch

One writer at a time: a run holds an exclusive flock on the folder itself for as long as it
runs (the kernel drops it when the process dies, so a killed run leaves nothing stuck), and a
second `vit train` into the same folder is refused at once.

Commit order of an epoch: every file is first written in full to a temp file in the folder
(`.NAME.PID.RANDOM.pending`, unique per process); only when all of them exist are they
renamed over the old ones, state.pt last. A full disk or a folder turned read-only fails
before the first rename and leaves the previous epoch's files as they were, temp files
removed. A crash between two renames can leave
last/best/metrics one epoch ahead of state.pt: state.pt is the truth, and a resume rewrites
last.safetensors from it, drops metrics rows past it, and replays that epoch (deterministic,
so best.safetensors gets the same bytes again).

JSON files are UTF-8; a path whose bytes are not UTF-8 keeps them as JSON escapes \\udcXX
(Python's surrogateescape), which json.loads + os.fsencode turn back into the exact bytes.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import pickle
import random
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import TrainingError
from ...fileio import atomic_write_bytes
from ...text import finite_or_none, json_bytes
from ...weights.files import library_reason
from .config import ResolvedConfig, config_from_saved

STATE_FORMAT = "vitcli-train-state"
STATE_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
METRIC_FIELDS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "images_per_s",
    "epoch_time_s",
    "train_images",
    "skipped_images",
)
_PENDING = re.compile(r"^\..+\.(pending|tmp)$")
_EPOCH_IN_SOURCE = re.compile(r"epoch (\d+)$")

Writer = Callable[[Path], None]


def bytes_writer(data: bytes) -> Writer:
    """A Writer that puts `data` in the file it is given (durably: checkpoints)."""
    return lambda path: atomic_write_bytes(path, data)


# -- RNG state as tensors (torch.load(weights_only=True) can read it back) ----------------------
def rng_state() -> dict:
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    assert isinstance(np_keys, np.ndarray)
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (
            python_state["version"],
            tuple(int(v) for v in python_state["state"].tolist()),
            python_state["gauss_next"],
        )
    )
    if (
        "cuda" in state
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


# -- state.pt ---------------------------------------------------------------------------------
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "step": (int,),
    "classes": (list,),
    "model": (dict,),
    "optimizer": (dict,),
    "rng": (dict,),
    "best_epoch": (int,),
    "best_metric_name": (str,),
}


def read_state(path: str | Path) -> dict:
    """The training state of a run (state.pt), loaded safely (no pickled code) and checked."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(
            f"{path}: no training state here; pass the --out folder of an earlier `vit train` run"
        ) from None
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run the file's code.
        raise TrainingError(
            f"{path}: holds pickled Python objects, not a vitcli training state (refused, "
            "nothing in it was run); start a new run (last.safetensors can be fine-tuned "
            "with --model)"
        ) from None
    except Exception as error:
        raise TrainingError(
            f"{path}: unreadable training state ({library_reason(error)}); the file is "
            "damaged, start a new run (last.safetensors can be fine-tuned with --model)"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a vitcli training state; start a new run")
    for key, kinds in _STATE_TYPES.items():
        if not isinstance(state.get(key), kinds) or isinstance(state.get(key), bool):
            raise TrainingError(f"{path}: damaged training state (field {key!r}); start a new run")
    if state["epoch"] < 1 or state["step"] < 0:
        raise TrainingError(f"{path}: damaged training state (epoch/step); start a new run")
    if not all(isinstance(name, str) for name in state["classes"]):
        raise TrainingError(f"{path}: damaged training state (classes); start a new run")
    if not (state.get("ema") is None or isinstance(state.get("ema"), dict)):
        raise TrainingError(f"{path}: damaged training state (field 'ema'); start a new run")
    return state


def state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, buffer)
    return buffer.getvalue()


# -- metrics ----------------------------------------------------------------------------------
def metrics_jsonl(history: Sequence[dict]) -> bytes:
    return "".join(
        json.dumps(finite_or_none(row), allow_nan=False) + "\n" for row in history
    ).encode()


def metrics_csv(history: Sequence[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in METRIC_FIELDS})
    return buffer.getvalue().encode()


def saved_epoch_of(path: Path) -> int | None:
    """The epoch a last/best.safetensors of ours says it holds (its source ends "epoch N"),
    read from the file's JSON header alone (any path, no tensors loaded); None if unreadable."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(handle.read(size))
        source = header.get("__metadata__", {}).get("source", "")
    except (OSError, ValueError, AttributeError):
        return None
    match = _EPOCH_IN_SOURCE.search(source) if isinstance(source, str) else None
    return int(match.group(1)) if match else None


class RunFolder:
    """One `vit train` output folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock_fd: int | None = None
        self.created = False  # this run made the folder (removed again if it stays empty)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    # -- one writer -----------------------------------------------------------------------
    def lock(self, create: bool) -> None:
        """Take the folder for this process (an exclusive flock on the folder, held until the
        process ends or `unlock`); `create` makes the folder first. A folder another process
        holds is refused at once."""
        try:
            if create and not self.path.exists():
                self.path.mkdir(parents=True)
                self.created = True
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileExistsError:  # a racing run made it between exists() and mkdir()
            return self.lock(create=False)
        except OSError as error:
            raise TrainingError(
                f"{self.path}: cannot use this run folder ({error.strerror or error}); "
                "choose a writable --out"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise TrainingError(
                    f"{self.path}: another `vit train` is writing this run folder; wait for it "
                    "to finish or choose another --out"
                ) from None
            return  # a filesystem without flock: run as before, unlocked
        self._lock_fd = fd

    def unlock(self) -> None:
        """Let the folder go; a folder this run made and left empty is removed."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only succeeds when nothing was written

    # -- a new run ----------------------------------------------------------------------
    def check_new(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise TrainingError(f"{self.path}: exists and is not a folder; choose another --out")
        if self.state_path.exists() or (self.path / LAST_FILE).exists():
            raise TrainingError(
                f"{self.path}: already holds a training run; pass --resume {self.path} to "
                "continue it, or choose another --out"
            )

    def write_config(self, data: dict) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path / CONFIG_FILE, json_bytes(data))
        except OSError as error:
            raise TrainingError(
                f"{self.path}: cannot write the run folder ({error.strerror or error}); "
                "choose a writable --out with free space"
            ) from None

    # -- resume -------------------------------------------------------------------------
    def load(self) -> tuple[dict, ResolvedConfig, dict]:
        """(state, saved configuration, config.json as read) of the run, each checked; one-line
        errors otherwise."""
        if not self.path.is_dir():
            raise TrainingError(
                f"{self.path}: no such run folder; pass the --out folder of an earlier "
                "`vit train` run"
            )
        config_path = self.path / CONFIG_FILE
        try:
            saved = json.loads(config_path.read_bytes())
        except FileNotFoundError:
            raise TrainingError(
                f"{config_path}: missing; {self.path} is not a `vit train` output folder"
            ) from None
        except (ValueError, OSError) as error:
            raise TrainingError(f"{config_path}: unreadable ({error}); cannot resume") from None
        config = config_from_saved(saved, config_path)
        if not self.state_path.exists():
            raise TrainingError(
                f"{self.path}: no {STATE_FILE} (the run stopped before its first epoch "
                "ended); start it again without --resume"
            )
        return read_state(self.state_path), config, saved

    def remove_pending(self) -> None:
        """Temp files a killed run left behind."""
        try:
            for entry in os.scandir(self.path):
                if _PENDING.match(entry.name) and entry.is_file(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder fails later, with a clear message, at the first commit

    def reconcile(self, state: dict, write_last: Writer, write_best: Writer) -> list[str]:
        """Make last/best.safetensors agree with state.pt after a crash between renames;
        returns notes on what was repaired."""
        notes = []
        epoch = state["epoch"]
        last = self.path / LAST_FILE
        if saved_epoch_of(last) != epoch:
            self._write(LAST_FILE, write_last, epoch)
            notes.append(f"{LAST_FILE} rewritten from {STATE_FILE} (epoch {epoch})")
        best = self.path / BEST_FILE
        best_epoch = saved_epoch_of(best)
        if (best_epoch is None or best_epoch > epoch) and state["best_epoch"] == epoch:
            self._write(BEST_FILE, write_best, epoch)
            notes.append(f"{BEST_FILE} rewritten from {STATE_FILE} (epoch {epoch})")
        return notes

    def read_history(self, upto_epoch: int) -> list[dict]:
        path = self.path / "metrics.jsonl"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        rows: list[dict] = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(row, dict)
                and isinstance(row.get("epoch"), int)
                and len(rows) + 1 == row["epoch"] <= upto_epoch
            ):
                rows.append(row)
        return rows

    # -- an epoch's commit ----------------------------------------------------------------
    def commit(self, epoch: int, writers: Sequence[tuple[str, Writer]], saved_epoch: int) -> None:
        """Write each (name, writer) to a temp file, then rename them all in order (put
        state.pt last). On OSError: temp files removed, TrainingError naming the epoch kept."""
        temps: list[tuple[Path, Path]] = []
        try:
            for name, write in writers:
                # Unique per process: two writers (a misuse the lock refuses) can never
                # rename each other's half-written files.
                temp = self.path / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.pending"
                temps.append((temp, self.path / name))
                write(temp)
            for temp, final in temps:
                os.replace(temp, final)
        except OSError as error:
            raise self._write_error(epoch, saved_epoch, error) from None
        finally:
            for temp, _ in temps:
                with contextlib.suppress(OSError):  # a read-only folder keeps nothing new
                    temp.unlink(missing_ok=True)
        try:  # make the renames durable
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _write(self, name: str, write: Writer, epoch: int) -> None:
        self.commit(epoch, [(name, write)], saved_epoch=epoch)

    def _write_error(self, epoch: int, saved_epoch: int, error: OSError) -> TrainingError:
        kept = (
            f"epoch {saved_epoch} is the last one saved"
            if saved_epoch
            else "no epoch was saved yet"
        )
        return TrainingError(
            f"{self.path}: cannot write the checkpoint of epoch {epoch} "
            f"({error.strerror or error}); {kept}; free some space or make the folder "
            f"writable, then continue with: vit train --resume {self.path}"
        )


def saved_epoch(path: str | Path) -> int:
    """The last epoch saved in a run folder (0 when none), for messages after an interrupt."""
    try:
        return int(read_state(Path(path) / STATE_FILE)["epoch"])
    except TrainingError:
        return 0


__all__ = [
    "BEST_FILE",
    "CONFIG_FILE",
    "LAST_FILE",
    "STATE_FILE",
    "RunFolder",
    "json_bytes",
    "metrics_csv",
    "metrics_jsonl",
    "read_state",
    "rng_state",
    "saved_epoch",
    "set_rng_state",
    "state_bytes",
]
