"""Stratified, seeded train/val/test splits saved as plain lists of image paths.

Split files (``train.txt``, ``val.txt``, ``test.txt``) hold one image path per line,
relative to the dataset root, POSIX, sorted; ``split.json`` records the root, seed,
ratios and per-class counts. Training reads them back with ``read_split`` and
``select_split``.

Stratification: each image is put in the stratum of its *rarest* class (the class held
by the fewest images of the dataset; ties broken by name), so a class that only appears
beside commoner ones still reaches every split. Images with no object form their own
stratum. Inside each stratum the images (sorted by path) are shuffled with the seed
and cut by the ratios, remainders going to the splits furthest below their share.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from metaldefect.atomic import write_text
from metaldefect.data.records import Record
from metaldefect.errors import DataError

SPLITS = ("train", "val", "test")
NO_OBJECT = "(no object)"


def relative_path(record: Record, root: str | Path) -> str:
    """The record's image path relative to ``root`` (a COCO json's folder if ``root`` is the json), POSIX.

    Symlinks are not followed, so a path stays under the root the user gave.
    """
    base = Path(root).parent if Path(root).is_file() else Path(root)
    return Path(os.path.relpath(os.path.abspath(record.path), os.path.abspath(base))).as_posix()


def check_ratios(ratios: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(ratio < 0 for ratio in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios {list(ratios)} must be three non-negative numbers summing to 1")
    return tuple(float(ratio) for ratio in ratios)


def cut(count: int, ratios: tuple[float, float, float]) -> list[int]:
    """Split ``count`` items by ``ratios`` into whole numbers (largest remainders get the rest)."""
    shares = [count * ratio for ratio in ratios]
    sizes = [int(share) for share in shares]
    by_remainder = sorted(range(3), key=lambda index: (sizes[index] - shares[index], index))
    for index in by_remainder[:count - sum(sizes)]:
        sizes[index] += 1
    return sizes


def make_split(records: list[Record], root: str | Path, ratios=(0.7, 0.2, 0.1),
               seed: int = 42) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` image paths relative to ``root``, each sorted."""
    ratios = check_ratios(ratios)
    images_per_class = Counter(label for record in records for label in set(record.labels))
    strata: dict[str, list[str]] = {}
    for record in records:
        rarest = min(set(record.labels), key=lambda label: (images_per_class[label], label), default=NO_OBJECT)
        strata.setdefault(rarest, []).append(relative_path(record, root))
    duplicates = [path for path, count in Counter(p for paths in strata.values() for p in paths).items() if count > 1]
    if duplicates:
        raise DataError(f"{duplicates[0]}: image listed twice in the dataset")
    rng = random.Random(seed)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for stratum in sorted(strata):
        paths = sorted(strata[stratum])
        rng.shuffle(paths)
        start = 0
        for name, size in zip(SPLITS, cut(len(paths), ratios)):
            splits[name].extend(paths[start:start + size])
            start += size
    return {name: sorted(paths) for name, paths in splits.items()}


def split_summary(records: list[Record], root: str | Path, splits: dict[str, list[str]]) -> dict:
    """Images, boxes and per-class box and image counts of each split."""
    by_path = {relative_path(record, root): record for record in records}
    summary = {}
    for name, paths in splits.items():
        chosen = [by_path[path] for path in paths]
        summary[name] = {
            "images": len(chosen),
            "boxes": sum(len(record.boxes) for record in chosen),
            "boxes_per_class": dict(sorted(Counter(l for r in chosen for l in r.labels).items())),
            "images_per_class": dict(sorted(Counter(l for r in chosen for l in set(r.labels)).items())),
        }
    return summary


def write_split(out_dir: str | Path, splits: dict[str, list[str]], records: list[Record], root: str | Path,
                ratios, seed: int) -> None:
    """Write ``train.txt``, ``val.txt``, ``test.txt`` and ``split.json`` into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    for name in SPLITS:
        write_text(out_dir / f"{name}.txt", "".join(path + "\n" for path in splits[name]))
    info = {"root": Path(os.path.abspath(root)).as_posix(), "seed": seed, "ratios": list(check_ratios(ratios)),
            "stratified_by": "rarest class of each image", "counts": split_summary(records, root, splits)}
    write_text(out_dir / "split.json", json.dumps(info, indent=2) + "\n")


def read_split(path: str | Path) -> list[str]:
    """The image paths of one split file (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read split file ({error.__class__.__name__})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def select_split(records: list[Record], root: str | Path, names: list[str],
                 split_file: str | Path = "split file") -> list[Record]:
    """The records named in a split (paths relative to ``root``), in the split's order.

    Raises DataError naming the entries that are not in the dataset (missing or dropped
    for a problem), so a split never silently shrinks.
    """
    by_path = {relative_path(record, root): record for record in records}
    missing = [name for name in names if name not in by_path]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{split_file}: {len(missing)} entries are not in the dataset at {root}: {shown}")
    return [by_path[name] for name in names]
