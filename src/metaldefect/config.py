"""Training configs: YAML files loaded into dataclasses, with ``key=value`` overrides.

A config is data (design.md): every paper experiment is a YAML file under ``configs/``.
Keys are checked against the dataclasses below, values against the field types; an
unknown key or a wrongly typed value raises :class:`ConfigError` naming the dotted key.
``model.head_kwargs`` is free-form here: the head's own constructor checks it.

Example::

    cfg = load_config("configs/paper/vit_multi_defect.yaml", ["train.lr=0.001", "model.head_kwargs.matching=hungarian"])
    save_config(cfg, run_dir / "config.yaml")
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metaldefect.atomic import write_text
from metaldefect.errors import ConfigError


@dataclass
class DataConfig:
    root: str = ""  # dataset root in any format the data layer reads (VOC, NEU-DET, GC10-DET, YOLO, COCO)
    format: str = "auto"
    split_dir: str | None = None  # folder with train.txt / val.txt / test.txt (`metaldefect data split`)
    split: list[float] = field(default_factory=lambda: [0.7, 0.2, 0.1])  # used when split_dir is null
    split_seed: int = 42
    classes: list[str] | None = None  # class vocabulary in index order; null = every class in the data, sorted
    strict: bool = False  # any data problem is an error instead of skip-and-report


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch14_dinov2"
    pretrained: bool = True
    weights_file: str | None = None
    input_size: int = 224
    layers: list[int] | None = None  # intermediate backbone layers to return (ViTs)
    head: str = "classifier"
    head_kwargs: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    frozen: bool = True  # frozen backbone + cached features; false = train through the backbone
    trainable_layers: int | None = None  # end to end only: last N parameterised backbone layers train; null = all
    tune_blocks: int = 0  # frozen ViT only: its last N blocks train with the head on cached features of the rest
    backbone_lr: float | None = None  # learning rate of trained backbone weights; null = train.lr
    # Layer-wise lr decay (BEiT): a ViT's block i of n (from 1) trains at backbone_lr * layer_decay ** (n - i), its
    # patch embedding at backbone_lr * layer_decay ** n; null = backbone_lr for the whole backbone.
    layer_decay: float | None = None
    # A run (its best checkpoint) or a checkpoint file whose trained weights this run starts from, e.g. heads trained
    # on frozen features, then fine-tuned end to end (train.frozen=false). The model settings must be the same,
    # but for the input size when the source trained a head alone (engine.checkpoint.start_from).
    init_from: str | None = None
    cache_dir: str | None = None  # feature cache; null = $METALDEFECT_CACHE/features or ~/.cache/metaldefect/features
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    schedule: str = "none"
    augment: list[str] = field(default_factory=lambda: ["hflip", "vflip"])
    monitor: str = "loss"  # val metric that picks checkpoint_best.pt and drives early stopping (map50 / map: detecting heads)
    monitor_mode: str = "min"
    early_stopping: int = 0  # patience in epochs without improvement of `monitor`; 0 = off
    # Train on the train and val images together, once the settings are chosen on val: no val scoring, the
    # checkpoint is the last epoch, test is scored at the end (docs/benchmarks.md, session 19: more images helped).
    final_fit: bool = False
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema_decay: float = 0.0  # exponential moving average of the trained weights, evaluated and saved; 0 = off
    # Arithmetic of training steps and feature extraction: fp32, bf16 (autocast), or auto = bf16 where the CPU
    # computes it natively (AMX, AVX512-BF16), fp32 elsewhere. Scoring and saved weights stay float32.
    precision: str = "auto"
    num_workers: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass
class Config:
    name: str = ""
    description: str = ""
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.schedule": ("none", "cosine"),
    "train.monitor_mode": ("min", "max"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),  # metaldefect.engine.precision.PRECISIONS (config stays torch-free)
}
# The views of metaldefect.data.transforms.VIEWS but "none", and the mix views of metaldefect.data.mixing
# (a test keeps them equal; config stays torch-free).
AUGMENTATIONS = ("hflip", "vflip", "rot180", "transpose", "rot90", "rot270", "antitranspose",
                 "shift_r", "shift_d", "shift_rd", "shift_rd_quarter", "shift_rd_3quarter",
                 "hflip+shift_r", "hflip+shift_d", "hflip+shift_rd", "vflip+shift_r", "vflip+shift_d",
                 "vflip+shift_rd", "rot180+shift_r", "rot180+shift_d", "rot180+shift_rd", "mix_x", "mix_y")
FREE_FORM = {"model.head_kwargs"}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config and apply ``key=value`` overrides (dotted keys, YAML values)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    cfg = from_dict(raw, source=str(path))
    if not cfg.name:
        cfg.name = path.stem
    return cfg


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of ``raw`` with each ``a.b.c=value`` set (the value parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=0.001")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build a checked :class:`Config` from nested dicts; raise ConfigError naming a bad key."""
    cfg = _build(Config, raw, prefix="", source=source)
    _check_values(cfg, source)
    return cfg


def _build(cls, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: {prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, key + ".", source)
        elif key in FREE_FORM:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
            values[name] = value
        else:
            values[name] = _coerce(value, hint, key, source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a type hint (int, float, bool, str, list[T], T | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(item, item_hint, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it is.
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        if isinstance(value, dict):
            return value
    else:
        raise ConfigError(f"{source}: {key}: unsupported type {hint}")
    raise ConfigError(f"{source}: {key}: expected {hint.__name__}, got {value!r}")


def _check_values(cfg: Config, source: str) -> None:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(choices)}")
    for i, view in enumerate(cfg.train.augment):
        if view not in AUGMENTATIONS:
            raise ConfigError(f"{source}: train.augment[{i}]: {view!r} is not one of {', '.join(AUGMENTATIONS)}")
    split = cfg.data.split
    if len(split) != 3 or any(p < 0 for p in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"{source}: data.split: expected three non-negative fractions summing to 1, got {split}")
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "model.input_size": cfg.model.input_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: {key}: must be positive, got {value}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"{source}: train.lr: must be positive, got {cfg.train.lr}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"{source}: train.ema_decay: must be in [0, 1) (0 = off), got {cfg.train.ema_decay}")
    if cfg.train.early_stopping < 0:
        raise ConfigError(f"{source}: train.early_stopping: must be >= 0, got {cfg.train.early_stopping}")
    if cfg.train.final_fit and cfg.train.early_stopping:
        raise ConfigError(f"{source}: train.early_stopping: needs val scores, which train.final_fit=true leaves out "
                          f"(it trains on val); set one of them to 0 / false")
    if cfg.train.tune_blocks < 0 or (cfg.train.tune_blocks and not cfg.train.frozen):
        raise ConfigError(f"{source}: train.tune_blocks: must be >= 0, and is for train.frozen=true only "
                          f"(got {cfg.train.tune_blocks} with frozen={cfg.train.frozen})")
    if cfg.train.layer_decay is not None and not 0 < cfg.train.layer_decay <= 1:
        raise ConfigError(f"{source}: train.layer_decay: must be in (0, 1] or null, got {cfg.train.layer_decay}")
    if cfg.train.backbone_lr is not None and cfg.train.backbone_lr <= 0:
        raise ConfigError(f"{source}: train.backbone_lr: must be positive or null, got {cfg.train.backbone_lr}")
    if cfg.train.trainable_layers is not None and cfg.train.trainable_layers < 0:
        raise ConfigError(f"{source}: train.trainable_layers: must be >= 0 or null, got {cfg.train.trainable_layers}")


def resolve_path(text: str | None) -> Path | None:
    """Expand ``~`` and ``$VARS`` and make a config path absolute (relative to the working directory)."""
    if text is None or text == "":
        return None
    return Path(os.path.expandvars(os.path.expanduser(text))).resolve()


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), loadable again by :func:`load_config`."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None))
