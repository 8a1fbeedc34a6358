"""The files of a run directory (layout in :mod:`metaldefect.engine.train`), each written atomically."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np

from metaldefect.atomic import write_text
from metaldefect.config import Config, resolve_path
from metaldefect.data import write_split
from metaldefect.data.records import Record
from metaldefect.engine.plots import plot_confusion, plot_curves

SPLIT_FILES = ("train.txt", "val.txt", "test.txt", "split.json")


def resolved_config(cfg: Config) -> Config:
    """``cfg`` with its paths made absolute, so the saved config runs from any directory."""
    absolute = lambda text: str(resolve_path(text)) if text else text  # noqa: E731
    data = dataclasses.replace(cfg.data, root=absolute(cfg.data.root), split_dir=absolute(cfg.data.split_dir))
    model = dataclasses.replace(cfg.model, weights_file=absolute(cfg.model.weights_file))
    train = dataclasses.replace(cfg.train, cache_dir=absolute(cfg.train.cache_dir))
    return dataclasses.replace(cfg, data=data, model=model, train=train)


def write_start_files(run_dir: Path, cfg: Config, classes: list[str], root: Path,
                      split_files: dict[str, list[str]], records: list[Record]) -> None:
    """``classes.json`` and ``split/``: the split files used (copied), or the split made for this run;
    after ``train.final_fit``, the split trained on (val's entries in train.txt, val.txt empty)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "classes.json", json.dumps(classes, indent=2) + "\n")
    split_dir = run_dir / "split"
    if cfg.train.final_fit:
        # The files say what trained, so that refine and evaluate see it: val's images are in train.txt.
        split_dir.mkdir(exist_ok=True)
        for name, paths in split_files.items():
            write_text(split_dir / f"{name}.txt", "".join(path + "\n" for path in paths))
        info = {"final_fit": "train.final_fit=true: the val images were trained on, with the train images",
                "source": str(resolve_path(cfg.data.split_dir)) if cfg.data.split_dir else None,
                "images": {name: len(paths) for name, paths in split_files.items()}}
        write_text(split_dir / "split.json", json.dumps(info, indent=2) + "\n")
    elif cfg.data.split_dir:
        source = resolve_path(cfg.data.split_dir)
        split_dir.mkdir(exist_ok=True)
        for name in SPLIT_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, split_dir / name)
    else:
        write_split(split_dir, split_files, records, root, cfg.data.split, cfg.data.split_seed)


def write_history(path: Path, history: list[dict]) -> None:
    """``history.csv``: one row per epoch, columns in first-seen order."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buffer.getvalue())


def epoch_summary(row: dict, monitor: str) -> str:
    """One log line per epoch: the losses, the head's main metrics and the monitored one."""
    keys = dict.fromkeys(("train_loss", "val_loss", "val_accuracy", "val_slot_acc_all", "val_mae", monitor))
    shown = [f"epoch {row['epoch']}"] + [f"{key}={row[key]:.4f}" for key in keys if key in row]
    return "  ".join(shown + [f"{row['seconds']:.1f}s"])


def write_results(run_dir: Path, title: str, metrics: dict, history: list[dict],
                  confusion: np.ndarray | None, labels: list[str]) -> None:
    """``metrics.json``, ``curves.png`` and ``confusion.png`` (the "no defect" row and column only if used)."""
    plot_curves(history, run_dir / "curves.png", title=title)
    if confusion is not None:
        keep = len(labels) if confusion[-1].sum() or confusion[:, -1].sum() else len(labels) - 1
        plot_confusion(confusion[:keep, :keep], labels[:keep], run_dir / "confusion.png",
                       title=f"{title}: validation, best epoch {metrics['best_epoch']}")
    write_text(run_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")


def json_safe(value):
    """NaN -> null, recursively, so metrics.json is valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
