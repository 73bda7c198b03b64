"""Training a ViT on an image folder: from scratch (a variant such as "Ti/16") or by fine-tuning
any model `load_model` reads, on one process or many (torchrun), resumable bit for bit.

Output directory (only rank 0 writes; every write is atomic, temp file + rename):
  config.json          the resolved run configuration (every option, defaults filled in)
  last.safetensors     the model after the last completed epoch (our format: labels + preprocess)
  best.safetensors     the model of the best epoch (val top-1, or train loss without validation)
  state.pt             model, EMA, optimizer, schedule, RNG states, epoch, step, best metric;
                       torch.save of tensors/dicts/lists/numbers/strings only, so
                       torch.load(weights_only=True) reads it
  metrics.jsonl/.csv   one row per epoch

Determinism: data order comes from (seed, epoch) (DistributedSampler), each sample's
augmentation from (seed, epoch, index), mixup from (seed, epoch, step), and the global torch RNG
(dropout, drop-path) is reseeded from (seed, epoch) at the start of every epoch. A run resumed
from the end of epoch k therefore replays epochs k+1... exactly as the uninterrupted run did.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..data.augment import TrainTransform, mix_batch
from ..data.folder import (
    EpochSampler,
    FolderDataset,
    LabelledBatch,
    ShardSampler,
    load_datasets,
    make_loader,
)
from ..data.preprocess import Preprocess
from ..errors import InputError, TrainingError
from ..model import ViT, ViTConfig
from ..model.config import is_variant
from ..weights.format import atomic_write_bytes, save_model

STATE_FORMAT = "vitcli-train-state"
STATE_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
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
# Parameters that weight decay leaves alone besides biases and norm weights (all ndim <= 1).
_NO_DECAY_NAMES = ("pos_embed", "cls_token")


@dataclass
class TrainConfig:
    """Every option of `vit train`; None means "the default for this mode" (scratch/fine-tune)."""

    data: str = ""
    out: str = ""
    model: str = "Ti/16"  # a variant (train from scratch) or a model reference (fine-tune)
    epochs: int | None = None  # scratch 30, fine-tune 10
    batch_size: int = 64  # per process
    image_size: int | None = None  # scratch 224, fine-tune: the model's
    lr: float | None = None  # scratch 1e-3, fine-tune 1e-4 (peak, after warmup)
    min_lr: float = 1e-6
    weight_decay: float | None = None  # 0.05 for both (decoupled, AdamW)
    warmup_epochs: float | None = None  # scratch min(5, 10% of epochs), fine-tune 10%
    beta2: float = 0.999
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    ema: float = 0.0  # EMA decay per step (e.g. 0.999); 0 = off
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0
    randaugment: int = 0  # ops per image; 0 = off
    randaugment_magnitude: int = 9  # 0..10
    crop_scale: float | None = (
        None  # smallest random-resized-crop area: scratch 0.35, fine-tune 0.5
    )
    hflip: bool = True
    # Architecture, from scratch only: the variant's values unless given.
    pos_embed: str = "learned"
    pool: str = "cls"
    depth: int | None = None
    width: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    dropout: float = 0.0
    drop_path: float = 0.0
    seed: int = 0
    val: str | None = None
    val_split: float = 0.0
    workers: int | None = None  # DataLoader processes; default min(4, cores // 2)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto: bf16 autocast on CUDA GPUs that support it; off: fp32. Never on CPU.

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    best_epoch: int
    best_metric: float | None
    best_metric_name: str
    history: list[dict]
    stopped_early: bool = False


Callback = Callable[[TrainEvent], None]


# -- schedule ---------------------------------------------------------------------------------
def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Linear warmup to `base_lr` over `warmup_steps`, then cosine down to `min_lr` (per step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only, not on biases, norms, pos_embed or CLS."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, beta2: float = 0.999
) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=(0.9, beta2))


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


def _seed_from(*parts) -> int:
    return random.Random(":".join(str(p) for p in parts)).getrandbits(63)


# -- RNG state as tensors (torch.load(weights_only=True) can read it back) ----------------------
def _rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
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


def _set_rng_state(state: dict) -> None:
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


def read_state(path: str | Path) -> dict:
    """The training state of a run (state.pt), loaded safely (no pickled code)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(
            f"{path}: no training state here; pass the --out folder of an earlier `vit train` run"
        ) from None
    except Exception as error:
        raise TrainingError(
            f"{path}: unreadable training state ({type(error).__name__}: {error}); start a new run"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a vitcli training state; start a new run")
    return state


# -- building the model -----------------------------------------------------------------------
@dataclass
class _Setup:
    model: ViT
    preprocess: Preprocess
    mode: str  # "scratch" | "finetune"
    source: str
    notes: list[str]


def resolve_defaults(config: TrainConfig, finetune: bool) -> TrainConfig:
    """Fill every None with the default of the mode (scratch or fine-tune)."""
    resolved = copy.copy(config)
    if resolved.epochs is None:
        resolved.epochs = 10 if finetune else 30
    if resolved.lr is None:
        resolved.lr = 1e-4 if finetune else 1e-3
    if resolved.weight_decay is None:
        resolved.weight_decay = 0.05
    if resolved.warmup_epochs is None:
        resolved.warmup_epochs = (
            0.1 * resolved.epochs if finetune else min(5.0, 0.1 * resolved.epochs)
        )
    if resolved.crop_scale is None:
        resolved.crop_scale = 0.5 if finetune else 0.35
    if resolved.workers is None:
        resolved.workers = min(4, (os.cpu_count() or 2) // 2)
    return resolved


def _check_options(config: TrainConfig) -> None:
    problems = []
    if config.epochs is not None and config.epochs < 1:
        problems.append("--epochs must be at least 1")
    if config.batch_size < 1:
        problems.append("--batch-size must be at least 1")
    if config.lr is not None and not config.lr > 0:
        problems.append("--lr must be positive")
    if not 0.0 <= config.label_smoothing < 1.0:
        problems.append("--label-smoothing must be in [0, 1)")
    if not 0.0 <= config.ema < 1.0:
        problems.append("--ema must be in [0, 1) (a decay such as 0.999; 0 turns it off)")
    if config.crop_scale is not None and not 0.0 < config.crop_scale <= 1.0:
        problems.append("--crop-scale must be in (0, 1]")
    if config.amp not in ("auto", "off"):
        problems.append("--amp must be auto or off")
    if problems:
        raise InputError("; ".join(problems))


def build_model(config: TrainConfig, classes: list[str]) -> _Setup:
    """A fresh ViT from a variant, or a loaded model adapted to `classes` and the image size."""
    num_classes = len(classes)
    if is_variant(config.model):
        overrides = {
            key: value
            for key, value in (
                ("depth", config.depth),
                ("width", config.width),
                ("num_heads", config.num_heads),
                ("mlp_dim", config.mlp_dim),
            )
            if value is not None
        }
        size = config.image_size or 224
        try:
            model_config = ViTConfig.from_variant(
                config.model,
                image_size=size,
                num_classes=num_classes,
                pos_embed=config.pos_embed,
                pool=config.pool,
                dropout=config.dropout,
                drop_path=config.drop_path,
                **overrides,
            )
        except ValueError as error:
            raise InputError(
                f"{error}; adjust --model/--depth/--width/--num-heads/--mlp-dim/--image-size"
            ) from None
        if overrides:
            model_config = model_config.replace(
                name=f"{model_config.name}-d{model_config.depth}-w{model_config.width}"
            )
        torch.manual_seed(_seed_from("init", config.seed))
        model = ViT(model_config)
        # Scratch models squash the whole image to the input size (bilinear, mean/std 0.5):
        # the random-resized-crop they train on also resizes without a fixed aspect, and
        # objects near the border are kept (a center crop would cut them).
        preprocess = Preprocess(
            size=model_config.image_size, resize="squash", interpolation="bilinear"
        )
        return _Setup(
            model, preprocess, "scratch", f"trained from scratch ({model_config.name})", []
        )

    from ..weights.resolve import load_model

    architecture = [
        name
        for name in ("depth", "width", "num_heads", "mlp_dim")
        if getattr(config, name) is not None
    ]
    if architecture:
        raise InputError(
            f"--{architecture[0].replace('_', '-')} only applies when training from scratch (--model Ti/16 etc.); "
            "a fine-tuned model keeps its architecture"
        )
    bundle = load_model(config.model)
    model, notes = bundle.model, []
    if list(bundle.labels) != list(classes):
        if sorted(bundle.labels) == sorted(classes):
            # Same label set in another order: permute the trained head rows instead of discarding them.
            order = [bundle.labels.index(name) for name in classes]
            with torch.no_grad():
                model.head.weight.copy_(model.head.weight[order])
                model.head.bias.copy_(model.head.bias[order])
            notes.append("head rows reordered to the dataset's class order")
        else:
            model.reset_head(num_classes)
            notes.append(f"head replaced: {len(bundle.labels)} -> {num_classes} classes")
    size = config.image_size
    if size is not None and (size, size) != tuple(model.config.image_size):
        try:
            model.set_image_size(size)
        except ValueError as error:
            raise InputError(f"--image-size {size}: {error}") from None
        notes.append(f"position embedding resampled to {size}x{size}")
    if config.dropout or config.drop_path:
        # Regularisers are not part of the stored weights: rebuild with them switched on.
        state = model.state_dict()
        model = ViT(model.config.replace(dropout=config.dropout, drop_path=config.drop_path))
        model.load_state_dict(state)
    preprocess = bundle.preprocess.with_size(model.config.image_size)
    return _Setup(model, preprocess, "finetune", f"fine-tuned from {config.model}", notes)


# -- the trainer ------------------------------------------------------------------------------
def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        if torch.cuda.is_available():
            return torch.device(
                "cuda",
                distributed.local_rank()
                if distributed.is_distributed()
                else torch.cuda.current_device(),
            )
        return torch.device("cpu")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise InputError(f"--device {config.device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is None and distributed.is_distributed():
        device = torch.device("cuda", distributed.local_rank())
    return device


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    # bf16 on a CPU without native support runs at under 1 GFLOP/s: never on CPU.
    return config.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not distributed.is_distributed():
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _all_reduce_max(value: float, device: torch.device) -> float:
    if not distributed.is_distributed():
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def _write_metrics(out: Path, history: list[dict]) -> None:
    atomic_write_bytes(
        out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history).encode()
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in METRIC_FIELDS})
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode())


def _read_history(out: Path, upto_epoch: int) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(row, dict)
            and isinstance(row.get("epoch"), int)
            and row["epoch"] <= upto_epoch
        ):
            rows.append(row)
    return rows


def _save_state_file(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _cpu_state_dict(module: torch.nn.Module) -> dict:
    return {
        name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()
    }


class _EMA:
    """Exponential moving average of the weights (Polyak), updated after every step."""

    def __init__(self, model: ViT, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: ViT) -> None:
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # B,k
    return int((top == labels[:, None]).any(dim=1).sum().item())


def train(
    config: TrainConfig,
    callback: Callback | None = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train as `config` says, writing into `config.out`; with `resume`, continue the run there.

    `stop_after_epoch` ends the run early after that many completed epochs, exactly as if it
    had been killed there (for tests and time-boxed jobs).
    """
    on_gpu = torch.cuda.is_available() and not config.device.startswith("cpu")
    if on_gpu and distributed.is_distributed():
        torch.cuda.set_device(distributed.local_rank())  # before NCCL picks a device
    distributed.init_from_env(backend="nccl" if on_gpu else "gloo")
    try:
        return _train(config, callback, resume, stop_after_epoch)
    finally:
        distributed.shutdown()


def _train(
    config: TrainConfig, callback: Callback | None, resume: bool, stop_after_epoch: int | None
) -> TrainResult:
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0

    def emit(event: TrainEvent) -> None:
        if callback is not None and (main or event.kind == "warning"):
            callback(event)

    out = Path(config.out).expanduser()
    state = None
    if resume:
        state, config = _load_resume(out, config)
    else:
        _check_options(config)
        if not config.data:
            raise InputError(
                "no training data given: pass DATA, a folder with one subfolder per class"
            )
        if not config.out:
            raise InputError("no output folder given: pass --out DIR")
        if (out / STATE_FILE).exists() or (out / "last.safetensors").exists():
            raise TrainingError(
                f"{out}: already holds a training run; pass --resume {out} to continue it, or choose another --out"
            )
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder; choose another --out")
        # Absolute paths in config.json, so --resume works from any working directory.
        config = copy.copy(config)
        config.data = str(Path(config.data).expanduser().resolve())
        if config.val:
            config.val = str(Path(config.val).expanduser().resolve())
        if not is_variant(config.model) and Path(config.model).expanduser().exists():
            config.model = str(Path(config.model).expanduser().resolve())

    train_data, val_data = load_datasets(
        config.data, val_dir=config.val, val_split=config.val_split, seed=config.seed
    )
    classes = train_data.classes
    finetune = not is_variant(config.model)
    config = resolve_defaults(config, finetune=finetune)
    if state is not None and list(state["classes"]) != classes:
        raise TrainingError(
            f"{config.data}: classes {classes[:5]} differ from the run's {list(state['classes'])[:5]}; "
            "resume with the same data"
        )
    setup = build_model(config, classes)
    device = _device(config)
    model = setup.model.to(device)
    ema = _EMA(model, config.ema) if config.ema > 0 else None
    optimizer = make_optimizer(model, config.lr, config.weight_decay, beta2=config.beta2)

    start_epoch, global_step = 0, 0
    best_metric, best_epoch = None, 0
    best_name = "val_top1" if val_data is not None else "train_loss"
    if state is not None:
        with torch.no_grad():
            model.load_state_dict(state["model"])
            if ema is not None and state.get("ema") is not None:
                ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_epoch, global_step = int(state["epoch"]), int(state["step"])
        best_metric, best_epoch = state.get("best_metric"), int(state.get("best_epoch", 0))
    history = _read_history(out, start_epoch) if state is not None else []

    # -- data -----------------------------------------------------------------------------
    transform = TrainTransform(
        setup.preprocess,
        scale=(config.crop_scale, 1.0),
        hflip=config.hflip,
        randaugment_ops=config.randaugment,
        randaugment_magnitude=config.randaugment_magnitude,
    )
    pin = device.type == "cuda"
    train_set = FolderDataset(train_data, transform, seed=config.seed)
    sampler = EpochSampler(len(train_set), seed=config.seed, rank=rank, world_size=world)
    train_loader = make_loader(
        train_set, sampler, config.batch_size, config.workers, seed=config.seed, pin_memory=pin
    )
    val_loader = None
    if val_data is not None:
        val_set = FolderDataset(val_data, setup.preprocess)
        val_loader = make_loader(
            val_set,
            ShardSampler(len(val_set), rank, world),
            config.batch_size,
            config.workers,
            seed=config.seed,
            pin_memory=pin,
        )
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    use_bf16 = _use_bf16(config, device)

    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(
            out / CONFIG_FILE,
            {
                **asdict(config),
                "mode": setup.mode,
                "classes": classes,
                "train_images": len(train_data),
                "val_images": len(val_data) if val_data is not None else 0,
                "model_config": model.config.to_dict(),
                "preprocess": setup.preprocess.to_dict(),
                "world_size": world,
                "steps_per_epoch": steps_per_epoch,
                "best_metric": best_name,
                "torch": torch.__version__,
            },
        )
    emit(
        TrainEvent(
            "start",
            epoch=start_epoch,
            epochs=config.epochs,
            steps=steps_per_epoch,
            metrics={
                "mode": setup.mode,
                "model": model.config.name or config.model,
                "parameters": model.num_parameters(),
                "classes": classes,
                "train_images": len(train_data),
                "val_images": len(val_data) if val_data is not None else 0,
                "device": str(device),
                "bf16": use_bf16,
                "world_size": world,
                "resumed_at_epoch": start_epoch if state is not None else None,
                "notes": setup.notes,
                "lr": config.lr,
                "out": str(out),
            },
        )
    )

    reported: set[tuple[str, int]] = set()

    def report_failures(batch: LabelledBatch, split: str) -> int:
        for index, message in batch.failures:
            if (split, index) not in reported:
                reported.add((split, index))
                emit(TrainEvent("warning", message=f"skipped unreadable image: {message}"))
        return len(batch.failures)

    num_classes = len(classes)
    smoothing = config.label_smoothing
    mixing = config.mixup > 0 or config.cutmix > 0
    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            stopped_early = True
            break
        torch.manual_seed(_seed_from("epoch", config.seed, epoch, rank))  # dropout / drop-path
        sampler.set_epoch(epoch)
        net.train()
        loss_sum, correct, seen, skipped = 0.0, 0, 0, 0
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        for step_in_epoch, batch in enumerate(train_loader):
            skipped += report_failures(batch, "train")
            lr = lr_at(global_step, config.lr, warmup_steps, total_steps, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if batch.pixels.numel() == 0 and world == 1:
                global_step += 1
                continue
            empty = batch.pixels.numel() == 0
            if empty:  # every image of this rank's batch failed: keep DDP's collectives in step
                pixels = torch.zeros((1, 3, *setup.preprocess.size), device=device)
                labels = torch.zeros(1, dtype=torch.int64, device=device)
            else:
                pixels = batch.pixels.to(device, non_blocking=pin)
                labels = batch.labels.to(device, non_blocking=pin)
            if mixing:
                targets = F.one_hot(labels, num_classes).float()
                pixels, targets = mix_batch(
                    pixels,
                    targets,
                    config.mixup,
                    config.cutmix,
                    random.Random(f"mix:{config.seed}:{epoch}:{step_in_epoch}:{rank}"),
                )
            else:
                targets = labels
            loss, norm, logits = train_step(
                net,
                model,
                optimizer,
                pixels,
                targets,
                label_smoothing=smoothing,
                grad_clip=config.grad_clip,
                use_bf16=use_bf16,
                scale=0.0 if empty else 1.0,
            )
            loss_value = float(loss.item())
            if not (math.isfinite(loss_value) and math.isfinite(float(norm))):
                last_good = (
                    f"the last good checkpoint (epoch {epoch}) is kept in {out}"
                    if epoch > 0
                    else "no checkpoint was written yet"
                )
                what = "the loss" if not math.isfinite(loss_value) else "the gradients"
                raise TrainingError(
                    f"{what} became NaN/inf at epoch {epoch + 1}, step {step_in_epoch + 1} (lr {lr:.3g}); {last_good}; "
                    "lower --lr or keep --grad-clip on, and start a new run"
                )
            optimizer.step()  # after the finiteness check: a NaN step never reaches the weights
            if ema is not None:
                ema.update(model)
            global_step += 1
            if not empty:
                count = labels.shape[0]
                loss_sum += loss_value * count
                correct += int((logits.argmax(dim=1) == labels).sum().item())
                seen += count
            if main and callback is not None:
                elapsed = time.perf_counter() - started
                callback(
                    TrainEvent(
                        "step",
                        epoch=epoch + 1,
                        epochs=config.epochs,
                        step=step_in_epoch + 1,
                        steps=steps_per_epoch,
                        metrics={
                            "loss": loss_sum / max(seen, 1),
                            "top1": correct / max(seen, 1),
                            "lr": lr,
                            "images_per_s": seen * world / elapsed if elapsed > 0 else 0.0,
                        },
                    )
                )
        train_time = time.perf_counter() - started
        loss_sum, correct, seen, skipped = _all_reduce_sum(
            [loss_sum, correct, seen, skipped], device
        )
        train_time = _all_reduce_max(train_time, device)

        row = {
            "epoch": epoch + 1,
            "step": global_step,
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
        if val_loader is not None:
            eval_model = ema.model if ema is not None else model
            row.update(_validate(eval_model, val_loader, device, use_bf16, report_failures))
        row["epoch_time_s"] = time.perf_counter() - started
        if row["train_loss"] is None:
            raise TrainingError(
                f"{config.data}: no image of epoch {epoch + 1} could be decoded; check the files"
            )

        metric = row[best_name]
        improved = metric is not None and (
            best_metric is None
            or (metric > best_metric if best_name == "val_top1" else metric < best_metric)
        )
        if improved:
            best_metric, best_epoch = metric, epoch + 1
        history.append(row)
        if main:
            saved = ema.model if ema is not None else model
            source = f"{setup.source}, epoch {epoch + 1}"
            # Order matters for crash safety: state.pt last, so it never points past files
            # that are not there yet; metrics rows beyond state.pt's epoch are dropped on resume.
            _write_metrics(out, history)
            save_model(
                saved,
                out / "last.safetensors",
                labels=classes,
                preprocess=setup.preprocess,
                source=source,
            )
            if improved:
                save_model(
                    saved,
                    out / "best.safetensors",
                    labels=classes,
                    preprocess=setup.preprocess,
                    source=source,
                )
            _save_state_file(
                out / STATE_FILE,
                {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "epoch": epoch + 1,
                    "step": global_step,
                    "classes": list(classes),
                    "model": _cpu_state_dict(model),
                    "ema": _cpu_state_dict(ema.model) if ema is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {
                        "name": "warmup_cosine",
                        "base_lr": config.lr,
                        "min_lr": config.min_lr,
                        "warmup_steps": warmup_steps,
                        "total_steps": total_steps,
                        "step": global_step,
                    },
                    "rng": _rng_state(),
                    "best_metric": best_metric,
                    "best_epoch": best_epoch,
                    "best_metric_name": best_name,
                },
            )
        emit(
            TrainEvent(
                "epoch",
                epoch=epoch + 1,
                epochs=config.epochs,
                steps=steps_per_epoch,
                metrics={
                    **row,
                    "best": improved,
                    "best_metric": best_metric,
                    "best_epoch": best_epoch,
                },
            )
        )
    distributed.barrier()
    return TrainResult(
        out_dir=out,
        epochs_done=len(history) and history[-1]["epoch"],
        best_epoch=best_epoch,
        best_metric=best_metric,
        best_metric_name=best_name,
        history=history,
        stopped_early=stopped_early,
    )


@torch.no_grad()
def _validate(model: ViT, loader, device: torch.device, use_bf16: bool, report_failures) -> dict:
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    for batch in loader:
        report_failures(batch, "val")
        if batch.pixels.numel() == 0:
            continue
        pixels, labels = batch.pixels.to(device), batch.labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(pixels)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum").item())
        top1 += _topk_correct(logits, labels, 1)
        top5 += _topk_correct(logits, labels, 5)
        seen += labels.shape[0]
    model.train(was_training)
    loss_sum, top1, top5, seen = _all_reduce_sum([loss_sum, top1, top5, seen], device)
    if not seen:
        return {"val_loss": None, "val_top1": None, "val_top5": None}
    return {"val_loss": loss_sum / seen, "val_top1": top1 / seen, "val_top5": top5 / seen}


def _load_resume(out: Path, overrides: TrainConfig) -> tuple[dict, TrainConfig]:
    """The saved state and configuration of the run in `out`, with --epochs/--workers/DATA
    taken from the new command line when given."""
    if not out.is_dir():
        raise TrainingError(
            f"{out}: no such run folder; pass the --out folder of an earlier `vit train` run"
        )
    config_path = out / CONFIG_FILE
    try:
        saved = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise TrainingError(
            f"{config_path}: missing; {out} is not a `vit train` output folder"
        ) from None
    except ValueError as error:
        raise TrainingError(f"{config_path}: not valid JSON ({error}); cannot resume") from None
    if not (out / STATE_FILE).exists():
        raise TrainingError(
            f"{out}: no {STATE_FILE} (the run stopped before its first epoch ended); start it again without --resume"
        )
    state = read_state(out / STATE_FILE)
    config = TrainConfig.from_dict(saved)
    config.out = str(out)
    if overrides.epochs is not None:
        config.epochs = overrides.epochs
    if overrides.workers is not None:
        config.workers = overrides.workers
    if overrides.data:
        config.data = str(Path(overrides.data).expanduser().resolve())
    if overrides.device != "auto":
        config.device = overrides.device
    _check_options(config)
    if config.epochs is not None and config.epochs < int(state["epoch"]):
        raise TrainingError(
            f"{out}: already trained {state['epoch']} epochs, more than --epochs {config.epochs}; pass a larger --epochs"
        )
    return state, config


__all__ = [
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "build_model",
    "lr_at",
    "make_optimizer",
    "parameter_groups",
    "read_state",
    "resolve_defaults",
    "train",
    "train_step",
]
