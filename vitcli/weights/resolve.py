"""`--model REF` resolution: our file, an HF or timm folder, a `vit train` run folder (its
best model), a Google .npz, a hub id, or the bundled default model (no reference, or one of
BUNDLED_NAMES)."""

from __future__ import annotations

import json
import os
import re
import stat
from importlib import resources
from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError, VitError
from .format import ModelBundle, load_vitcli_file
from .readers import read_json, read_safetensors
from .stamp import stamp

DEFAULT_MODEL_NAME = "vit-shapes-p16.safetensors"
BUNDLED_NAME = "vit-shapes-p16"
# Names that always mean the bundled model (a local folder of that name: write ./bundled).
BUNDLED_NAMES = ("bundled", BUNDLED_NAME, "default")
# Shown by `vit info` instead of the file's own free-text source, which names a path on the
# machine that trained it.
BUNDLED_SOURCE = "bundled with vitcli (six synthetic shapes; recipe in weights/README.md)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


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


def load_model(reference: str | Path | None = None) -> ModelBundle:
    """Load any supported checkpoint; the architecture and preprocessing come from it.

    None means the user's default: the VIT_MODEL environment variable when set, else the
    bundled model (`bundled` always names the bundled one). The bundle is stamped with its
    source (weights/stamp.py), which caches use as a cheap key."""
    bundle, source = _load(reference)
    if bundle.stamp is None and source is not None:
        bundle.stamp = stamp(source, bundle.model)
    return bundle


def _load(reference: str | Path | None) -> tuple[ModelBundle, Path | None]:
    if reference is None and os.environ.get("VIT_MODEL", "").strip():
        try:
            return load_model(os.environ["VIT_MODEL"].strip()), None
        except VitError as error:
            raise type(error)(
                f"{error} (the model named by VIT_MODEL; unset it or fix it)"
            ) from None
    if reference is None or str(reference) in ("", *BUNDLED_NAMES):
        return load_bundled(), None
    text = str(reference)
    path = Path(text).expanduser()
    kind = _kind(path)
    named = _named_family(text) if kind == "missing" else None
    if named is not None:
        from .originals import load_raw_pth

        family, arch, file = named
        if _kind(Path(file).expanduser()) != "file":
            raise ModelNotFoundError(f"{file}: no such file (named by --model {text})")
        return load_raw_pth(Path(file).expanduser(), text, family=family, arch=arch), Path(
            file
        ).expanduser()
    if kind == "file":
        return _load_file(path, text), path
    if kind == "folder":
        return _load_folder(path, text), path
    if kind == "other":
        raise CheckpointError(
            f"{text}: not a regular file or folder (a FIFO, device or socket is never read); "
            "pass a model file or folder"
        )
    looks_like_file = path.suffix.lower() in (".safetensors", ".npz", ".bin", ".pt", ".pth")
    if _HUB_ID.match(text) and not looks_like_file and not path.parent.is_dir():
        from .hub import download

        folder = download(text)
        return _load_folder(folder, text), folder
    raise ModelNotFoundError(
        f"{text}: no such file or folder; pass a .safetensors/.npz file, a model folder, "
        f"a hub id such as google/vit-base-patch16-224, or {BUNDLED_NAME} (the bundled model)"
    )


def _named_family(text: str) -> tuple[str, str | None, str] | None:
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


def as_bundle(model: ModelBundle | str | Path | None) -> ModelBundle:
    """A service's `model` argument: a loaded bundle as it is, anything else through
    `load_model` (so the commands pass what the user typed, and the service loads it)."""
    return model if isinstance(model, ModelBundle) else load_model(model)


def load_bundled() -> ModelBundle:
    """The bundled model, named so users can type it, without its build machine's paths."""
    path = default_model_path()
    bundle = load_vitcli_file(path, reference=BUNDLED_NAME)
    bundle.stamp = stamp(path, bundle.model)
    bundle.extra["source"] = BUNDLED_SOURCE
    bundle.extra["bundled"] = True
    return bundle


def _kind(path: Path) -> str:
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


def _load_file(path: Path, reference: str) -> ModelBundle:
    suffix = path.suffix.lower()
    if path.name == RUN_STATE and is_run_folder(path.parent):
        run = path.parent
        raise CheckpointError(
            f"{path}: the training state of a `vit train` run (for --resume), not a model; "
            f"pass the run folder {run} (its best model) or {run / RUN_LAST} (the last epoch)"
        )
    if suffix == ".npz":
        from .npz import load_npz

        return load_npz(path, reference=reference)
    if path.name.startswith("open_clip_"):
        from .originals import load_openclip

        return load_openclip(path, reference=reference)
    if suffix == ".safetensors":
        _, metadata = read_safetensors(path, meta=True)  # the header only
        if metadata.get("format") == "vitcli" and metadata.get("quantization"):
            return _load_int8_file(path, reference, metadata)  # `vit convert --int8`
        if metadata.get("format") == "vitcli":
            return load_vitcli_file(path, reference=reference)
        if (path.parent / "config.json").exists():
            return _load_folder(path.parent, reference)
        raise CheckpointError(
            f"{path}: a safetensors file without vitcli metadata and no config.json beside it; "
            "pass its model folder (with config.json) instead"
        )
    if suffix in (".bin", ".pt", ".pth"):
        if (path.parent / "config.json").exists():
            return _load_folder(path.parent, reference)
        from .originals import load_raw_pth  # identified from evidence, else a clear error

        return load_raw_pth(path, reference=reference)
    raise CheckpointError(
        f"{path}: unknown checkpoint type {suffix or '(no extension)'}; "
        "use .safetensors, .npz or a model folder"
    )


def _load_folder(path: Path, reference: str) -> ModelBundle:
    run = run_folder_model(path)
    if run is not None:
        bundle = _load_file(run[0], reference)
        bundle.extra["run_model"] = run[1]
        return bundle
    config_path = path / "config.json"
    openclip = sorted(path.glob("open_clip_*model.safetensors")) or sorted(
        path.glob("open_clip_*.bin")
    )
    if not config_path.exists() and openclip:
        return _load_file(openclip[0], reference)
    if not config_path.exists():
        ours = sorted(path.glob("*.safetensors"))
        if len(ours) == 1:
            return _load_file(ours[0], reference)
        raise ModelNotFoundError(
            f"{path}: no config.json in this folder; pass a model folder or a weights file"
        )
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, not {type(config).__name__}")
    if "architecture" in config or "pretrained_cfg" in config:
        from .timm_families import load_timm

        return load_timm(path, config, reference=reference)
    from .hf_families import load_hf

    return load_hf(path, config, reference=reference)


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
        _, metadata = read_safetensors(model_file, meta=True)
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


def _load_int8_file(path: Path, reference: str, metadata: dict[str, str]) -> ModelBundle:
    """An int8 file (`vit convert --int8`): its loader holds the config to a float file's
    limits before anything is built."""
    from .int8 import load_quantized

    return load_quantized(path, reference=reference)
