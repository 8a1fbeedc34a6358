"""The data of a run: records read, filtered to the class vocabulary, split, and encoded as targets."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from metaldefect.config import Config, resolve_path
from metaldefect.data import load_dataset, make_split, read_split, select_split
from metaldefect.data.encoders import make_target
from metaldefect.data.records import Record
from metaldefect.errors import ConfigError
from metaldefect.models.heads import head_class

SPLITS = ("train", "val", "test")


@dataclass
class RunData:
    """The records and generic targets of each split, and the class vocabulary."""

    root: Path
    classes: list[str]
    records: dict[str, list[Record]]
    targets: dict[str, list[dict]]
    split_files: dict[str, list[str]]

    @property
    def max_objects(self) -> int:
        return max((len(r.labels) for records in self.records.values() for r in records), default=0)


def build_data(cfg: Config, say=lambda text: print(text, file=sys.stderr)) -> RunData:
    """Read the dataset, keep the configured classes, split it, and encode the targets."""
    root = resolve_path(cfg.data.root)
    if root is None:
        raise ConfigError("data.root: no dataset given (set data.root=PATH)")
    records, problems = load_dataset(root, cfg.data.format, strict=cfg.data.strict)
    problems.print(limit=10)
    if not records:
        raise ConfigError(f"data.root: no usable images in {root}")
    task = head_class(cfg.model.head).task
    classes = list(cfg.data.classes) if cfg.data.classes else sorted({l for r in records for l in r.labels})
    if len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes: a class is listed twice: {classes}")

    if cfg.data.split_dir:
        split_dir = resolve_path(cfg.data.split_dir)
        if not (split_dir / "train.txt").is_file():
            raise ConfigError(f"data.split_dir: {split_dir} has no train.txt; make the split with "
                              f"`metaldefect data split {root} --out {split_dir}` or set data.split_dir=null")
        split_files = {name: read_split(split_dir / f"{name}.txt") if (split_dir / f"{name}.txt").exists() else []
                       for name in SPLITS}
        chosen = {name: select_split(records, root, split_files[name], split_dir / f"{name}.txt") for name in SPLITS}
        chosen = {name: keep_classes(rs, classes, task, say, name) for name, rs in chosen.items()}
    else:
        kept = keep_classes(records, classes, task, say, "data")
        split_files = make_split(kept, root, cfg.data.split, cfg.data.split_seed)
        chosen = {name: select_split(kept, root, split_files[name]) for name in SPLITS}
    for name in ("train", "val"):
        if not chosen[name]:
            raise ConfigError(f"data: the {name} split is empty (check data.split / data.split_dir and data.classes)")
    if cfg.train.final_fit:
        chosen, split_files = fold_val_into_train(chosen, split_files)
        say(f"train.final_fit: training on the train and val images together ({len(chosen['train'])}); "
            f"no val scores, the checkpoint is the last epoch")
    index = {name: i for i, name in enumerate(classes)}
    targets = {name: [make_target(r, index) for r in rs] for name, rs in chosen.items()}
    return RunData(root, classes, chosen, targets, split_files)


def fold_val_into_train(chosen: dict[str, list[Record]], split_files: dict[str, list[str]]):
    """The splits with val's records and file entries moved into train (each sorted, as split files are)."""
    records = sorted(chosen["train"] + chosen["val"], key=lambda record: str(record.path))
    return ({**chosen, "train": records, "val": []},
            {**split_files, "train": sorted(split_files["train"] + split_files["val"]), "val": []})


def keep_classes(records: list[Record], classes: list[str], task: str, say, where: str) -> list[Record]:
    """Drop objects of classes outside the vocabulary, and images left without an object because of it.

    A classifier also drops images without any object (they have no class). What was
    dropped is reported, never silent.
    """
    wanted = set(classes)
    kept, dropped_objects, dropped_images = [], 0, 0
    for record in records:
        pairs = [(b, l) for b, l in zip(record.boxes, record.labels) if l in wanted]
        dropped_objects += len(record.labels) - len(pairs)
        if (record.labels and not pairs) or (task == "classify" and not pairs):
            dropped_images += 1
            continue
        kept.append(record.with_objects([b for b, _ in pairs], [l for _, l in pairs]))
    if dropped_objects or dropped_images:
        say(f"{where}: left out {dropped_objects} objects of classes not in the class list "
            f"and {dropped_images} images without a usable object")
    return kept


def resolve_num_slots(value, data: RunData) -> int:
    """K: "auto" = the most objects any image of the data holds (11 for the paper's set)."""
    most = data.max_objects
    if value in (None, "auto"):
        return max(1, most)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.head_kwargs.num_slots: expected a positive integer or auto, got {value!r}")
    if value < most:
        worst = max((r for rs in data.records.values() for r in rs), key=lambda r: len(r.labels))
        raise ConfigError(f"model.head_kwargs.num_slots: {value} slots but {worst.path} holds {most} objects")
    return value
