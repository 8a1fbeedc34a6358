"""A training run: ``build_*(cfg)`` factories, the run directory, resume, early stopping, seeding.

``train(cfg, runs_dir)`` writes ``runs_dir/NAME/``::

    config.yaml         the resolved config
    classes.json        the class vocabulary (index order)
    split/              train.txt, val.txt, test.txt used (copied, or made here with data.split_seed;
                        after train.final_fit, train.txt holds the val images too and val.txt is empty)
    history.csv         one row per epoch: lr, train_* and val_* losses and metrics, seconds
    curves.png          train against val per metric (the paper's figures)
    confusion.png       validation confusion matrix of the best checkpoint
    metrics.json        best and final val metrics, test metrics, weights used
    checkpoint_best.pt  weights of the best epoch (by train.monitor; the last epoch after a final fit)
    checkpoint_last.pt  everything needed to resume

Under ``torchrun`` every process runs this same function; only rank 0 writes.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from metaldefect.config import Config, resolve_path, save_config
from metaldefect.data.dataset import FeatureDataset, ImageDataset, collate, with_images
from metaldefect.data.mixing import Mixes, mix_plans
from metaldefect.engine import distributed
from metaldefect.engine.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint, start_from
from metaldefect.engine.engine import evaluate, train_one_epoch, unwrap
from metaldefect.engine.features import extract_features
from metaldefect.engine.metrics import improved
from metaldefect.engine.optim import build_optimizer, build_scheduler
from metaldefect.engine.plots import plot_curves
from metaldefect.engine.precision import dtype_name, training_dtype
from metaldefect.engine.run_data import SPLITS, RunData, build_data, resolve_num_slots
from metaldefect.engine.run_files import (epoch_summary, resolved_config, write_history, write_results,
                                          write_start_files)
from metaldefect.errors import ConfigError
from metaldefect.models.factory import DefectModel, create_model
from metaldefect.models.heads import head_class
from metaldefect.models.tail_tuning import BackboneStem, TunedTail, stem_cut
from metaldefect.models.weights import cache_dir as user_cache_dir

NO_DEFECT = "no defect"
# Config sections that must not change when a run is resumed (they define the data and the model).
RESUME_FIXED = ("data", "model", "seed")
# curves.png is redrawn during a run at most this often (drawing costs about a second), and at the end.
PLOT_EVERY_SECONDS = 60.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config, data: RunData) -> tuple[DefectModel, dict]:
    """The model and the ``create_model`` keyword arguments that rebuild it (stored in checkpoints)."""
    head_kwargs = dict(cfg.model.head_kwargs)
    if cfg.model.head == "slots":
        head_kwargs["num_slots"] = resolve_num_slots(head_kwargs.get("num_slots", "auto"), data)
    spec = dict(backbone_name=cfg.model.backbone, head_name=cfg.model.head, num_classes=len(data.classes),
                pretrained=cfg.model.pretrained, weights_file=cfg.model.weights_file,
                input_size=cfg.model.input_size, layers=cfg.model.layers, head_kwargs=head_kwargs)
    try:
        model = create_model(**spec)
    except ValueError as error:  # a head's own check of its options
        raise ConfigError(f"model.head_kwargs: {error}") from None
    return model, spec


def build_loaders(cfg: Config, data: RunData, model: DefectModel, dist: distributed.DistInfo,
                  say=lambda text: print(text, file=sys.stderr), dtype: torch.dtype = torch.float32
                  ) -> tuple[dict[str, DataLoader], DistributedSampler, int]:
    """Loaders per split, the train sampler, and how many image views had to go through the backbone.

    Frozen: features from the cache (rank 0 extracts what is missing first, its forward passes
    in ``dtype``): the backbone's, or with ``train.tune_blocks`` those of its frozen stem; else images.
    """
    computed = 0
    views = tuple(cfg.train.augment)
    train_paths = [str(r.path) for r in data.records["train"]]
    plans = mix_plans(views, train_paths, data.targets["train"])
    mixes = {name: Mixes(plans, train_paths) if name == "train" else None for name in SPLITS}
    if plans and getattr(model.head, "needs_image", False):
        raise ConfigError(f"train.augment: mix views ({', '.join(plans)}) are not supported for a head that "
                          "learns from the image too (model.head_kwargs.detail_width)")
    if cfg.train.frozen:
        cache_dir = resolve_path(cfg.train.cache_dir) or user_cache_dir() / "features"
        extractor = model.backbone
        if cfg.train.tune_blocks:
            extractor = BackboneStem(model.backbone, stem_cut(model.backbone, cfg.train.tune_blocks))
        # One canonical image order (sorted paths of every split), so that every config and
        # split over the same dataset shares one "none" entry. The other views are only ever
        # read for training images, so only those go through the backbone again.
        wanted = {"none": sorted({str(r.path) for name in SPLITS for r in data.records[name]}),
                  **({"views": sorted(str(r.path) for r in data.records["train"])} if views else {})}
        feature_sets = {}
        for turn in ("first", "rest"):  # rank 0 fills the cache; the others then read it
            if (turn == "first") == dist.is_main:
                say(f"features: {extractor.name} at {cfg.model.input_size}px in {dtype_name(dtype)}, "
                    f"views {('none', *views)} (all but 'none' for train images only), cache {cache_dir}")
                for part, paths in wanted.items():
                    feature_sets[part] = extract_features(
                        extractor, paths, cache_dir, batch_size=cfg.train.batch_size,
                        views=("none",) if part == "none" else views, progress=cfg.train.progress and dist.is_main,
                        dtype=dtype, mixes=plans)
            distributed.barrier()
        computed = sum(sum(feature_set.computed.values()) for feature_set in feature_sets.values())
        datasets = {name: FeatureDataset(_source(feature_sets, [str(r.path) for r in data.records[name]]),
                                         data.targets[name], views if name == "train" else (), mixes[name])
                    for name in SPLITS}
        if getattr(model.head, "needs_image", False):  # the head learns from the pixels as well
            for name, dataset in datasets.items():
                dataset.source = with_images(dataset.source, [r.path for r in data.records[name]],
                                             cfg.model.input_size)
    else:
        datasets = {name: ImageDataset(data.records[name], data.targets[name], cfg.model.input_size,
                                       views if name == "train" else (), mixes[name])
                    for name in SPLITS}
    train_sampler = DistributedSampler(datasets["train"], num_replicas=dist.world_size, rank=dist.rank,
                                       shuffle=True, seed=cfg.seed)
    loaders = {"train": DataLoader(datasets["train"], batch_size=cfg.train.batch_size, sampler=train_sampler,
                                   num_workers=cfg.train.num_workers, collate_fn=collate)}
    for name in ("val", "test"):
        # Each process evaluates every world_size-th image: no padding, so sums over processes are exact.
        shard = list(range(dist.rank, len(datasets[name]), dist.world_size))
        loaders[name] = DataLoader(datasets[name], batch_size=cfg.train.batch_size, sampler=shard,
                                   num_workers=cfg.train.num_workers, collate_fn=collate)
    return loaders, train_sampler, computed


def _source(feature_sets: dict, paths: list[str]):
    """``source(index, view)`` for a FeatureDataset: image ``paths[index]`` of a split, read from the
    cache's "none" set or, for another view, from its "views" set (train images only)."""
    rows = {part: feature_set.index for part, feature_set in feature_sets.items()}

    def source(index: int, view: str) -> dict:
        part = "none" if view == "none" else "views"
        return feature_sets[part].get(rows[part][paths[index]], view)
    return source


def build_ema(cfg: Config, trained: nn.Module) -> ModelEmaV3 | None:
    """A moving average of ``trained``'s weights and buffers (YOLO and DETR-family detectors keep one), or None.

    Its decay is 0 at the first optimizer step (a copy), then warms up as ``1 - step^-3/4`` (the
    shorter-run setting timm suggests) and stops rising at ``train.ema_decay``.
    """
    if not cfg.train.ema_decay:
        return None
    return ModelEmaV3(trained, decay=cfg.train.ema_decay, use_warmup=True, warmup_power=0.75)


def train(cfg: Config, runs_dir: str | Path = "runs", resume: bool = False) -> Path:
    """Run (or resume) training as ``cfg`` says; return the run directory."""
    dist = distributed.init(cfg.train.device)
    try:
        return _train(cfg, Path(runs_dir), resume, dist)
    finally:
        distributed.shutdown()


def _train(cfg: Config, runs_dir: Path, resume: bool, dist: distributed.DistInfo) -> Path:
    main = dist.is_main
    say = (lambda text: tqdm.write(text, file=sys.stderr)) if main else (lambda text: None)
    run_dir = runs_dir / cfg.name
    last_path = run_dir / "checkpoint_last.pt"
    checkpoint = _check_run_dir(cfg, run_dir, resume)
    distributed.barrier()

    seed_everything(cfg.seed)  # the same on every process, so every process builds the same model
    data = build_data(cfg, say)
    model, spec = build_model(cfg, data)
    if cfg.train.init_from and checkpoint is None:  # a resumed run has its own weights
        start_from(model, spec, data.classes, cfg.train.init_from)
        say(f"starting from the weights of {cfg.train.init_from}")
    model.to(dist.device)
    dtype = training_dtype(cfg.train.precision, dist.device)
    features_started = time.time()
    loaders, train_sampler, features_computed = build_loaders(cfg, data, model, dist, say, dtype)
    feature_seconds = time.time() - features_started
    if cfg.train.frozen and cfg.train.tune_blocks:
        module: nn.Module = TunedTail(model, stem_cut(model.backbone, cfg.train.tune_blocks))
    elif cfg.train.frozen:
        module = model.head  # the backbone's work is in the feature cache
    else:
        model.set_trainable(cfg.train.trainable_layers)
        module = model
    module.to(memory_format=torch.channels_last)  # train_one_epoch feeds it channels-last inputs
    if dist.distributed:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, broadcast_buffers=False)
    optimizer = build_optimizer(cfg, module)
    scheduler = build_scheduler(cfg, optimizer)
    trained = unwrap(module)
    part = ("tuned" if cfg.train.tune_blocks else "head") if cfg.train.frozen else "model"
    ema = build_ema(cfg, trained)
    evaluated = ema.module if ema is not None else trained  # what is scored each epoch and saved as best

    history: list[dict] = []
    state = {"best": None, "best_epoch": 0, "stale": 0, "stopped_early": False}
    start_epoch = 0
    if checkpoint is not None:
        if checkpoint["part"] != part:
            raise ConfigError(f"{run_dir}: cannot resume training the {part}: the run was started training "
                              f"the {checkpoint['part']} (train.frozen, train.tune_blocks)")
        model.load_trained(part, checkpoint["state"])
        if ema is not None:
            if "ema_state" not in checkpoint:
                raise ConfigError(f"{run_dir}: cannot resume with train.ema_decay set: the run was started without it")
            load_trained_state(ema.module, part, checkpoint["ema_state"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history, state, start_epoch = checkpoint["history"], checkpoint["trainer"], checkpoint["epoch"]
        restore_rng(checkpoint["rng"][dist.rank] if dist.rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
        say(f"resuming {run_dir} after epoch {start_epoch}")
    else:
        seed_everything(cfg.seed + dist.rank)  # augmentation and dropout differ between processes
        if main:
            every = [r for name in SPLITS for r in data.records[name]]
            write_start_files(run_dir, cfg, data.classes, data.root, data.split_files, every)

    monitor = f"val_{cfg.train.monitor}"
    resolved = resolved_config(cfg)
    base = {"part": part, "model_spec": spec, "classes": data.classes, "weights": model.backbone.weights_info,
            "config": resolved.to_dict()}
    if part != "model" and model.backbone.weights_info["source"] == "random":
        # A random frozen backbone cannot be rebuilt otherwise (copied: a tuned tail trains in place;
        # its own blocks are loaded over these when the model is rebuilt).
        base["backbone_state"] = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    if main:
        save_config(resolved, run_dir / "config.yaml")
    started = last_plot = time.time()
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        if state["stopped_early"]:
            break
        epoch_start = time.time()
        train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(module, loaders["train"], optimizer, epoch, dist.device,
                                        cfg.train.grad_clip, progress=cfg.train.progress and main, ema=ema,
                                        dtype=dtype)
        val_metrics = {}
        if not cfg.train.final_fit:  # a final fit trains on val: nothing is left to score each epoch
            val_metrics, _ = evaluate(evaluated, loaders["val"], dist.device, progress=cfg.train.progress and main,
                                      dtype=dtype)
        scheduler.step()
        row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train_metrics.items()},
               **{f"val_{k}": v for k, v in val_metrics.items()}, "seconds": round(time.time() - epoch_start, 3)}
        history.append(row)
        if monitor not in row and not cfg.train.final_fit:
            raise ConfigError(f"train.monitor: {cfg.train.monitor!r} is not a metric of this head "
                              f"(choose from {', '.join(sorted(val_metrics))})")
        if cfg.train.final_fit or improved(row[monitor], state["best"], cfg.train.monitor_mode):
            state.update(best=row.get(monitor), best_epoch=epoch, stale=0)
            if main:
                save_checkpoint(run_dir / "checkpoint_best.pt",
                                {**base, "epoch": epoch, "state": trained_state(evaluated), "metrics": val_metrics})
        else:
            state["stale"] += 1
        if cfg.train.early_stopping and state["stale"] >= cfg.train.early_stopping:
            state["stopped_early"] = True
        rng = _gather_rng(dist)
        if main:
            save_checkpoint(last_path, {**base, "epoch": epoch, "state": trained_state(trained), "metrics": val_metrics,
                                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                        "rng": rng, "history": history, "trainer": dict(state),
                                        **({"ema_state": trained_state(ema.module)} if ema is not None else {})})
            write_history(run_dir / "history.csv", history)
            if time.time() - last_plot > PLOT_EVERY_SECONDS:
                plot_curves(history, run_dir / "curves.png", title=cfg.name)
                last_plot = time.time()
            say(epoch_summary(row, monitor))
        if state["stopped_early"]:
            say(f"early stopping: {monitor} has not improved for {state['stale']} epochs")

    timing = {"train_seconds": round(time.time() - started, 1), "feature_seconds": round(feature_seconds, 1),
              "features_computed": features_computed, "precision": dtype_name(dtype)}
    _finish(cfg, run_dir, data, module, model, loaders, dist, history, state, base, timing)
    return run_dir


def trained_state(trained: nn.Module) -> dict:
    """What a checkpoint stores of the trained module (a head, a ``TunedTail`` or the whole model),
    in the standard (contiguous) layout whatever the layout it trained in."""
    state = trained.trained_state() if isinstance(trained, TunedTail) else trained.state_dict()
    return {name: value.contiguous() for name, value in state.items()}


def load_trained_state(trained: nn.Module, part: str, state: dict) -> None:
    """Load ``trained_state``'s output back into a trained module (or a copy of one, as the EMA's)."""
    if isinstance(trained, TunedTail):
        trained.model.load_trained(part, state)
    else:
        trained.load_state_dict(state)


def _check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> dict | None:
    """The checkpoint to resume from (None for a new run); refuse to overwrite or mismatch a run."""
    last = run_dir / "checkpoint_last.pt"
    if resume:
        if not last.exists():
            raise ConfigError(f"{run_dir}: nothing to resume (no checkpoint_last.pt); start it without --resume")
        checkpoint = load_checkpoint(last)
        saved = checkpoint["config"]
        current = resolved_config(cfg).to_dict()
        for key in RESUME_FIXED:
            if key in saved and saved[key] != current[key]:
                raise ConfigError(f"{run_dir}: cannot resume with a different {key!r} section than the run was "
                                  f"started with (see {run_dir / 'config.yaml'})")
        return checkpoint
    if last.exists() or (run_dir / "history.csv").exists():
        raise ConfigError(f"{run_dir}: a run of this name exists; resume it with --resume or choose another name=")
    return None


def _gather_rng(dist: distributed.DistInfo) -> list[dict]:
    """Every process's RNG state, in rank order (gathered to rank 0 for the checkpoint)."""
    state = capture_rng()
    if not dist.distributed:
        return [state]
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _finish(cfg: Config, run_dir: Path, data: RunData, module: nn.Module, model: DefectModel, loaders: dict,
            dist: distributed.DistInfo, history: list[dict], state: dict, base: dict, timing: dict) -> None:
    """Evaluate the best weights on val (with the confusion matrix; none after a final fit) and test; write
    the results."""
    best_path = run_dir / "checkpoint_best.pt"
    distributed.barrier()
    if best_path.exists():
        model.load_trained(base["part"], load_checkpoint(best_path)["state"])
    progress = cfg.train.progress and dist.is_main
    labels = data.classes + [NO_DEFECT]
    val_metrics, confusion = None, None
    if data.records["val"]:
        val_metrics, confusion = evaluate(module, loaders["val"], dist.device, len(labels), progress)
    test_metrics = None
    if data.records["test"]:
        test_metrics, _ = evaluate(module, loaders["test"], dist.device, progress=progress, desc="test")
    if not dist.is_main:
        return
    metrics = {
        "name": cfg.name,
        "head": cfg.model.head,
        "task": head_class(cfg.model.head).task,
        "classes": data.classes,
        "num_slots": base["model_spec"]["head_kwargs"].get("num_slots"),
        "images": {name: len(data.records[name]) for name in SPLITS},
        "epochs_run": len(history),
        "stopped_early": state["stopped_early"],
        "monitor": None if cfg.train.final_fit else {"metric": f"val_{cfg.train.monitor}",
                                                     "mode": cfg.train.monitor_mode},
        "final_fit": cfg.train.final_fit,
        "best_epoch": state["best_epoch"],
        "checkpoint": best_path.name,
        "best": val_metrics,
        "final": {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")} if history else {},
        "test": test_metrics,
        "confusion": confusion.tolist() if confusion is not None else None,
        "confusion_labels": labels if confusion is not None else None,
        "weights": base["weights"],
        "frozen_backbone": cfg.train.frozen,
        "world_size": dist.world_size,
        **timing,  # wall-clock seconds of this invocation (a resumed run counts its own part)
    }
    write_results(run_dir, cfg.name, metrics, history, confusion.numpy() if confusion is not None else None, labels)
