"""What a run needs before its first step: the model (fresh from a variant, or loaded and
adapted for fine-tuning), the optimizer, the data loaders and the device."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from ...data.augment import TrainTransform
from ...data.folder import LabelledImages
from ...data.labelled import EpochSampler, FolderDataset, ShardSampler, make_loader
from ...data.preprocess import Preprocess
from ...errors import InputError, OptionError
from ...model import ViT, ViTConfig
from ...runtime import resolve_device
from .config import ARCH_LIMITS, ResolvedConfig, TrainConfig

# Parameters that weight decay leaves alone besides biases and norm weights (all ndim <= 1):
# the position table and the prefix tokens (CLS, DeiT's dist, registers), layer-scale gammas
# and SigLIP's attention-pool probe, as timm's no_weight_decay() lists them.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "gamma", "latent")


def seed_from(*parts: object) -> int:
    """A 63-bit seed derived from any parts (str seeds hash with sha512: stable everywhere)."""
    return random.Random(":".join(str(p) for p in parts)).getrandbits(63)


@dataclass
class Built:
    model: ViT
    preprocess: Preprocess
    mode: str  # "scratch" | "finetune"
    source: str
    notes: list[str] = field(default_factory=list)


def build_model(config: TrainConfig, classes: list[str]) -> Built:
    """A fresh ViT from a variant, or a loaded model adapted to `classes` and the image size."""
    if not config.finetune:
        return _scratch(config, len(classes))
    return _finetune(config, classes)


def _scratch(config: TrainConfig, num_classes: int) -> Built:
    overrides = {name: getattr(config, name) for name in ARCH_LIMITS}
    overrides = {name: value for name, value in overrides.items() if value is not None}
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
        raise OptionError(
            f"{error}; adjust --model/--depth/--width/--heads/--mlp-dim/--image-size"
        ) from None
    if overrides:
        model_config = model_config.replace(
            name=f"{model_config.name}-d{model_config.depth}-w{model_config.width}"
        )
    torch.manual_seed(seed_from("init", config.seed))
    model = ViT(model_config)
    # Scratch models squash the whole image to the input size (bilinear, mean/std 0.5): the
    # random-resized-crop they train on also resizes without a fixed aspect, and objects near
    # the border are kept (a center crop would cut them).
    preprocess = Preprocess(size=model_config.image_size, resize="squash", interpolation="bilinear")
    return Built(model, preprocess, "scratch", f"trained from scratch ({model_config.name})")


def _finetune(config: TrainConfig, classes: list[str]) -> Built:
    from ...weights.resolve import load_model

    given = [name for name in ARCH_LIMITS if getattr(config, name) is not None]
    if given:
        flag = "--" + {"num_heads": "heads"}.get(given[0], given[0]).replace("_", "-")
        raise InputError(
            f"{flag} only applies when training from scratch (--model Ti/16 etc.); "
            "a fine-tuned model keeps its architecture"
        )
    bundle = load_model(config.model)
    model, notes = bundle.model, []
    if bundle.config.head_kind == "projection" or bundle.config.num_classes == 0:
        # An embedding model (CLIP projection, DINOv2 backbone): a new classifier on its
        # pooled features. The projection is dropped, as timm's fine-tuning does.
        model.reset_head(len(classes))
        notes.append(f"new head: {len(classes)} classes on the pooled features")
    elif list(bundle.labels) != list(classes):
        if sorted(bundle.labels) == sorted(classes):
            # Same label set in another order: permute the trained head rows, keep them.
            order = [bundle.labels.index(name) for name in classes]
            with torch.no_grad():
                for head in (model.head, model.head_dist):
                    if isinstance(head, torch.nn.Linear):  # DeiT's dist head too
                        head.weight.copy_(head.weight[order])
                        head.bias.copy_(head.bias[order])
            notes.append("head rows reordered to the dataset's class order")
        else:
            model.reset_head(len(classes))
            notes.append(f"head replaced: {len(bundle.labels)} -> {len(classes)} classes")
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
    return Built(model, preprocess, "finetune", f"fine-tuned from {config.model}", notes)


class EMA:
    """Exponential moving average of the weights (Polyak), updated after every step."""

    def __init__(self, model: ViT, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: ViT) -> None:
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def cpu_state_dict(module: torch.nn.Module) -> dict:
    return {
        name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()
    }


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


def device_for(config: TrainConfig) -> torch.device:
    """--device through runtime.resolve_device (auto, cpu, cuda, cuda:N, mps); `cuda` under
    torchrun is the LOCAL_RANK GPU."""
    return resolve_device(config.device)


@dataclass
class Loaders:
    train: DataLoader
    sampler: EpochSampler  # set_epoch before each epoch
    val: DataLoader | None


def make_loaders(
    config: ResolvedConfig,
    train_data: LabelledImages,
    val_data: LabelledImages | None,
    preprocess: Preprocess,
    rank: int,
    world: int,
    pin_memory: bool,
) -> Loaders:
    """uint8 batches from worker processes: augmented crops for training, the model's own
    preprocessing for validation; normalisation happens on the device (data.loader.normalize)."""
    transform = TrainTransform(
        preprocess,
        scale=(config.crop_scale, 1.0),
        hflip=config.hflip,
        randaugment_ops=config.randaugment,
        randaugment_magnitude=config.randaugment_magnitude,
    )
    train_set = FolderDataset(train_data, transform, seed=config.seed)
    sampler = EpochSampler(len(train_set), seed=config.seed, rank=rank, world_size=world)
    train_loader = make_loader(
        train_set,
        sampler,
        config.batch_size,
        config.workers,
        seed=config.seed,
        pin_memory=pin_memory,
    )
    val_loader = None
    if val_data is not None:
        val_set = FolderDataset(val_data, preprocess)
        val_loader = make_loader(
            val_set,
            ShardSampler(len(val_set), rank, world),
            config.batch_size,
            config.workers,
            seed=config.seed,
            pin_memory=pin_memory,
        )
    return Loaders(train_loader, sampler, val_loader)
