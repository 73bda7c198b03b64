"""Training a ViT on an image folder: from scratch (a variant such as "Ti/16") or by
fine-tuning any model `load_model` reads, on one process or many (torchrun), resumable bit
for bit.

  config.py    TrainConfig (one field per option), check, resolve -> ResolvedConfig
  setup.py     model, optimizer, data loaders, device
  loop.py      the epochs: step, validation, checkpoint
  targets.py   targets and hit counts (one class, or a group of classes per image)
  rundir.py    the run folder: files, commit order, state.pt, resume
  service.py   run(options, on_progress) -> TrainResult
"""

from .config import Amp, Pool, PosEmbed, ResolvedConfig, TrainConfig, check, resolve
from .loop import TrainEvent, TrainResult, lr_at, train_step
from .rundir import read_state, saved_epoch
from .service import run
from .setup import make_optimizer, parameter_groups

__all__ = [
    "Amp",
    "Pool",
    "PosEmbed",
    "ResolvedConfig",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "check",
    "lr_at",
    "make_optimizer",
    "parameter_groups",
    "read_state",
    "resolve",
    "run",
    "saved_epoch",
    "train_step",
]
