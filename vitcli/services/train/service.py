"""`vit train` as a service: options -> run(options, on_progress) -> TrainResult.

The service checks the options, opens or creates the run folder, reads the data, builds the
model and hands everything to the loop; the CLI only parses and renders. One process or many
(torchrun: DistributedDataParallel, only rank 0 writes).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from ... import distributed
from ...data.folder import load_datasets
from ...data.preprocess import Preprocess
from ...errors import InputError, TrainingError, VitError
from ...model import ViT, ViTConfig
from ...runtime import default_training_workers, resolve_workers
from .amp import AmpChoice, choose_amp
from .config import ARCH_LIMITS, MAX_IMAGE_SIZE, ResolvedConfig, TrainConfig, check, resolve
from .loop import (
    Callback,
    Run,
    TrainEvent,
    TrainResult,
    model_writer,
    train_epochs,
)
from .probe import FeatureLoader, ProbeNet, cache_features, freeze_backbone, uses_cached_features
from .rundir import CONFIG_FILE, RunFolder, set_rng_state
from .setup import EMA, Built, Loaders, build_model, device_for, make_loaders, make_optimizer
from .targets import label_targets

# Options a resumed run takes from the new command line; every other one is the run's own.
RESUME_OVERRIDES = ("data", "out", "resume", "epochs", "workers", "device")


def run(
    options: TrainConfig,
    on_progress: Callback | None = None,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train as `options` say, writing into `options.out`; with `options.resume`, continue the
    run in that folder. `stop_after_epoch` ends the run after that many completed epochs,
    exactly as if it had been killed there (for tests and time-boxed jobs)."""
    check(options)
    device_for(options)  # a bad --device fails before any data is read
    device_name = options.device.strip().lower()
    on_gpu = torch.cuda.is_available() and (device_name == "auto" or device_name.startswith("cuda"))
    if on_gpu and distributed.is_distributed():
        torch.cuda.set_device(distributed.local_rank())  # before NCCL picks a device
    distributed.init_from_env(backend="nccl" if on_gpu else "gloo")
    try:
        return _run(options, on_progress, stop_after_epoch)
    finally:
        distributed.shutdown()


def _run(
    options: TrainConfig, on_progress: Callback | None, stop_after_epoch: int | None
) -> TrainResult:
    rank = distributed.rank()

    def emit(event: TrainEvent) -> None:
        if on_progress is not None and (rank == 0 or event.kind == "warning"):
            on_progress(event)

    folder, wanted, state, saved_json = _open(options, emit)
    try:
        return _train(folder, wanted, state, saved_json, emit, stop_after_epoch)
    finally:
        folder.unlock()


def _train(
    folder: RunFolder,
    wanted: TrainConfig,
    state: dict | None,
    saved_json: dict,
    emit: Callback,
    stop_after_epoch: int | None,
) -> TrainResult:
    rank, world = distributed.rank(), distributed.world_size()
    if state is not None and state["epoch"] == wanted.epochs:
        return _finished(folder, state)

    train_data, val_data = load_datasets(
        wanted.data, val_dir=wanted.val or None, val_split=wanted.val_split, seed=wanted.seed
    )
    for message in train_data.skipped + (val_data.skipped if val_data is not None else []):
        emit(TrainEvent("warning", message=message))
    classes = train_data.classes
    if state is not None and list(state["classes"]) != classes:
        raise TrainingError(
            f"{wanted.data}: classes {classes[:5]} differ from the run's "
            f"{list(state['classes'])[:5]}; resume with the same data"
        )
    built = (
        _rebuild(saved_json, folder, classes) if state is not None else build_model(wanted, classes)
    )
    workers, warning = resolve_workers(wanted.workers, default=default_training_workers())
    if warning:
        emit(TrainEvent("warning", message=warning))
    config = resolve(wanted, image_size=built.model.config.image_size[0], workers=workers)

    device = device_for(config)
    model = built.model.to(device)
    if config.linear_probe:
        freeze_backbone(model)  # before the optimizer: it only holds the heads
    cached = uses_cached_features(
        config.linear_probe, config.randaugment, config.mixup, config.cutmix
    )
    ema = EMA(model, config.ema) if config.ema > 0 else None
    optimizer = make_optimizer(model, config.lr, config.weight_decay, beta2=config.beta2)
    loaders = make_loaders(
        config,
        train_data,
        val_data,
        built.preprocess,
        rank=rank,
        world=world,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = len(loaders.train)
    net: torch.nn.Module = ProbeNet(model, cached) if config.linear_probe else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if state is not None and isinstance(state.get("bf16"), bool) and config.amp == "auto":
        # A resume trains as the run began (re-timing could choose otherwise: not bit for bit).
        began = "bf16 autocast" if state["bf16"] else "float32"
        amp = AmpChoice(state["bf16"], f"{began}, as the run began (state.pt)")
    else:
        amp = choose_amp(config.amp, model, device, model.config.image_size, cached_features=cached)
    if world > 1:  # every rank trains as rank 0 measured (timings differ a little per rank)
        amp = distributed.broadcast_object(amp)
    run_ = Run(
        config=config,
        folder=folder,
        model=model,
        net=net,
        ema=ema,
        optimizer=optimizer,
        preprocess=built.preprocess,
        classes=classes,
        source=built.source,
        device=device,
        use_bf16=amp.bf16,
        rank=rank,
        world=world,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
        total_steps=steps_per_epoch * config.epochs,
        emit=emit,
        best_name="val_top1" if val_data is not None else "train_loss",
        features=cached,
        label_targets=label_targets(len(classes), train_data.group_indices(), device),
    )
    start_epoch = _restore(run_, state) if state is not None else 0
    if cached:  # after _restore: a resumed probe reads its backbone from state.pt
        loaders = _feature_loaders(run_, loaders, train_data)
    notes = list(built.notes)
    if train_data.groups:
        grouped = sum(1 for _, label in train_data.samples if label >= len(classes))
        notes.append(
            f"{grouped} images in {len(train_data.groups)} multi-class folders "
            f"({', '.join('+'.join(g) for g in train_data.groups[:3])}"
            f"{', ...' if len(train_data.groups) > 3 else ''}): each of their classes "
            "gets an equal share of the target"
        )
    if config.linear_probe:
        notes.append(
            "linear probe: backbone frozen"
            + (", features computed once per image" if cached else ", augmented every step")
        )
    if rank == 0:
        folder.remove_pending()
        folder.write_config(
            {
                **config.to_dict(),
                "mode": built.mode,
                "source": built.source,
                "classes": classes,
                "groups": ["+".join(group) for group in train_data.groups],
                "train_images": len(train_data),
                "val_images": len(val_data) if val_data is not None else 0,
                "model_config": model.config.to_dict(),
                "preprocess": built.preprocess.to_dict(),
                "world_size": world,
                "steps_per_epoch": steps_per_epoch,
                "best_metric": run_.best_name,
                "torch": torch.__version__,
            }
        )
        if state is not None:
            writer = model_writer(run_, start_epoch)
            notes += folder.reconcile(state, writer, writer)
    emit(
        TrainEvent(
            "start",
            epoch=start_epoch,
            epochs=config.epochs,
            steps=steps_per_epoch,
            metrics={
                "mode": built.mode,
                "model": model.config.name or config.model,
                "parameters": model.num_parameters(),
                "classes": classes,
                "train_images": len(train_data),
                "val_images": len(val_data) if val_data is not None else 0,
                "device": str(device),
                "bf16": run_.use_bf16,
                "amp": amp.reason,
                "world_size": world,
                "workers": config.workers,
                "resumed_at_epoch": start_epoch if state is not None else None,
                "notes": notes,
                "lr": config.lr,
                "out": str(folder),
            },
        )
    )
    stopped = train_epochs(run_, loaders, start_epoch, stop_after_epoch)
    distributed.barrier()
    return TrainResult(
        out_dir=folder.path,
        epochs_done=run_.history[-1]["epoch"] if run_.history else start_epoch,
        best_epoch=run_.best_epoch,
        best_metric=run_.best_metric,
        best_metric_name=run_.best_name,
        history=run_.history,
        stopped_early=stopped,
    )


def _feature_loaders(run: Run, loaders: Loaders, train_data) -> Loaders:
    """The linear probe's training batches: features computed once, in the image loader's
    order, sharding and length (so the schedule and a resume see the same steps)."""
    config = run.config
    features, labels, failures = cache_features(
        run.model, train_data, run.preprocess, run.device, config.batch_size, config.workers
    )
    feature_loader = FeatureLoader(features, labels, failures, loaders.sampler, config.batch_size)
    assert len(feature_loader) == len(loaders.train)
    return Loaders(feature_loader, loaders.sampler, loaders.val)  # type: ignore[arg-type]


def _open(options: TrainConfig, emit: Callback) -> tuple[RunFolder, TrainConfig, dict | None, dict]:
    """(run folder, the configuration to train with, state.pt or None, config.json or {}):
    the folder of a run to resume, checked, or a new one that must not hold a run yet."""
    if not options.resume:
        if not options.data:
            raise InputError(
                "pass DATA (a folder with one subfolder per class), "
                "or --resume DIR to continue a run"
            )
        if not options.out:
            raise InputError("pass --out DIR: the folder for checkpoints and metrics")
        folder = RunFolder(options.out)
        folder.check_new()
        if distributed.is_main():  # only rank 0 writes the folder
            folder.lock(create=True)
            try:
                folder.check_new()  # again, now that no other run can be writing it
            except BaseException:
                folder.unlock()
                raise
        return folder, _absolute(options), None, {}
    folder = RunFolder(options.resume)
    if options.out and Path(options.out).resolve() != folder.path.resolve():
        raise InputError(
            "--resume continues the run in its own folder; drop --out or pass the same folder"
        )
    if distributed.is_main() and folder.path.is_dir():
        folder.lock(create=False)
    try:
        state, saved, saved_json = folder.load()
        wanted = _resumed(saved, options, emit)
        if state["epoch"] > wanted.epochs:
            raise TrainingError(
                f"{folder}: already trained {state['epoch']} epochs, more than --epochs "
                f"{wanted.epochs}; pass a larger --epochs"
            )
    except BaseException:
        folder.unlock()
        raise
    return folder, wanted, state, saved_json


def _absolute(options: TrainConfig) -> TrainConfig:
    """Absolute paths in config.json, so --resume works from any working directory."""
    model = options.model
    if options.finetune and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return options.replace(
        data=str(Path(options.data).expanduser().resolve()),
        val=str(Path(options.val).expanduser().resolve()) if options.val else "",
        model=model,
    )


def _resumed(saved: ResolvedConfig, options: TrainConfig, emit: Callback) -> ResolvedConfig:
    """The run's saved configuration with DATA, --epochs, --workers and --device taken from the
    new command line when given; other options given with another value are named."""
    defaults = TrainConfig()
    ignored = []
    for item in fields(TrainConfig):
        name, given = item.name, getattr(options, item.name)
        if name in RESUME_OVERRIDES or given == getattr(defaults, name):
            continue
        if name in ("val", "model") and given and Path(given).exists():
            given = str(Path(given).resolve())
        if given != getattr(saved, name):
            ignored.append("--" + {"num_heads": "heads"}.get(name, name).replace("_", "-"))
    if ignored:
        emit(
            TrainEvent(
                "warning",
                message="ignored with --resume (the run keeps the settings in its config.json): "
                + ", ".join(ignored),
            )
        )
    changes: dict = {}
    if options.epochs is not None:
        changes["epochs"] = options.epochs
    if options.workers is not None:
        changes["workers"] = options.workers
    if options.data:
        changes["data"] = str(Path(options.data).expanduser().resolve())
    if options.device != defaults.device:
        changes["device"] = options.device
    resumed = saved.replace(**changes)
    assert isinstance(resumed, ResolvedConfig)
    if resumed.warmup_epochs > resumed.epochs:
        resumed = resumed.replace(warmup_epochs=float(resumed.epochs))
    return resumed  # type: ignore[return-value]


def _finished(folder: RunFolder, state: dict) -> TrainResult:
    history = folder.read_history(state["epoch"])
    return TrainResult(
        out_dir=folder.path,
        epochs_done=state["epoch"],
        best_epoch=state["best_epoch"],
        best_metric=state.get("best_metric"),
        best_metric_name=state["best_metric_name"],
        history=history,
        nothing_to_do=True,
    )


def _rebuild(saved: dict, folder: RunFolder, classes: list[str]) -> Built:
    """The run's model architecture and preprocessing from its config.json (the weights come
    from state.pt), so a fine-tuned run resumes without its source model."""
    where = folder.path / CONFIG_FILE
    try:
        model_config = ViTConfig.from_dict(dict(saved["model_config"]))
        preprocess = Preprocess.from_dict(dict(saved["preprocess"]))
        too_big = [name for name, high in ARCH_LIMITS.items() if getattr(model_config, name) > high]
        if too_big or max(model_config.image_size) > MAX_IMAGE_SIZE:
            raise ValueError(f"{(too_big or ['image_size'])[0]} out of range")
        if model_config.num_classes != len(classes):
            raise ValueError(f"{model_config.num_classes} classes, the data has {len(classes)}")
    except (KeyError, TypeError, ValueError, VitError) as error:
        raise TrainingError(
            f"{where}: damaged model_config/preprocess ({error}); cannot resume"
        ) from None
    mode = saved.get("mode") if saved.get("mode") in ("scratch", "finetune") else "scratch"
    source = saved.get("source")
    if not isinstance(source, str):
        source = (
            f"trained from scratch ({model_config.name})"
            if mode == "scratch"
            else f"fine-tuned from {saved.get('model')}"
        )
    return Built(ViT(model_config), preprocess, str(mode), source)


def _restore(run: Run, state: dict) -> int:
    """Load state.pt into the run; returns the epoch it ended at."""
    where = run.folder.state_path
    try:
        with torch.no_grad():
            run.model.load_state_dict(state["model"])
            if run.ema is not None and state.get("ema") is not None:
                run.ema.model.load_state_dict(state["ema"])
        run.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise TrainingError(
            f"{where}: does not match the run's model ({reason}); start a new run"
        ) from None
    run.step = state["step"]
    best = state.get("best_metric")
    run.best_metric = float(best) if isinstance(best, (int, float)) else None
    run.best_epoch = state["best_epoch"]
    run.history = run.folder.read_history(state["epoch"])
    return state["epoch"]
