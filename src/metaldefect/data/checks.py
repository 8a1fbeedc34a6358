"""Checks every reader applies: finding a label's image, image size, and box repair.

Each check either repairs the data and reports it (``kind="fixed"``: an inverted box is
swapped, a box outside the image is clipped) or drops the object or file and reports it
(``kind="error"``), so one bad object never stops the rest of a dataset from loading.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

from metaldefect.data.images import IMAGE_SUFFIXES, image_size
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record
from metaldefect.errors import DataError


def is_hidden(path: Path, root: Path) -> bool:
    """True for files inside dot-folders under ``root`` (caches, our own staging folders)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_files(folder: Path, suffixes: Iterable[str]) -> list[Path]:
    """Every file under ``folder`` (recursive, dot-folders skipped) with one of ``suffixes``, sorted."""
    wanted = {suffix.lower() for suffix in suffixes}
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.rglob("*")
                  if path.suffix.lower() in wanted and path.is_file() and not is_hidden(path, folder))


class ImageIndex:
    """Images under one or more folders, looked up by a key (by default the file stem).

    Remembers which images were claimed by a label, so the ones left over can be
    reported as images without a label.
    """

    def __init__(self, folders: Iterable[Path], key: Callable[[Path], str] = lambda path: path.stem,
                 log: ProblemLog | None = None):
        self.key = key
        self.by_key: dict[str, Path] = {}
        self.claimed: set[Path] = set()
        for folder in folders:
            for path in find_files(folder, IMAGE_SUFFIXES):
                name = key(path)
                if name in self.by_key:
                    if log is not None:
                        log.add(path, f"another image has the same name ({self.by_key[name]}); "
                                      "this one is ignored", kind="fixed")
                    continue
                self.by_key[name] = path

    def claim(self, key: str) -> Path | None:
        path = self.by_key.get(key)
        if path is not None:
            self.claimed.add(path)
        return path

    def report_unlabelled(self, log: ProblemLog) -> None:
        for path in sorted(set(self.by_key.values()) - self.claimed):
            log.add(path, "image has no label file; skipped")


def clean_box(file: str | Path, index: int, box: list[float], width: int, height: int,
              log: ProblemLog) -> list[float] | None:
    """Repair one ``[xmin, ymin, xmax, ymax]`` box or drop it (None), reporting either."""
    what = f"object {index + 1}"
    if len(box) != 4 or not all(math.isfinite(value) for value in box):
        log.add(file, f"{what}: box {box} is not four finite numbers; dropped")
        return None
    x1, y1, x2, y2 = box
    if x1 > x2 or y1 > y2:
        log.add(file, f"{what}: inverted box {_fmt(box)}; corners swapped", kind="fixed")
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        log.add(file, f"{what}: box {_fmt(box)} has zero area inside the {width}x{height} image; dropped")
        return None
    if clipped != [x1, y1, x2, y2]:
        log.add(file, f"{what}: box {_fmt(box)} reaches outside the {width}x{height} image; "
                      f"clipped to {_fmt(clipped)}", kind="fixed")
    return clipped


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{value:g}" for value in box) + "]"


def build_record(label_file: Path, image: Path | None, expected_image: Path,
                 label_size: tuple[int, int] | None, objects: list[tuple[int, str, list[float]]],
                 source: str, log: ProblemLog, require_images: bool) -> Record | None:
    """One record from a parsed label file, or None (reported) when it cannot be used.

    Args:
        label_file: the label file, named in every problem about it.
        image: the image found for it, or None.
        expected_image: where the image should be; the record's path when the image is
            missing and ``require_images`` is False (label-only statistics).
        label_size: ``(width, height)`` written in the label, if any.
        objects: ``(index in the label file, class name, [xmin, ymin, xmax, ymax])``,
            names already mapped to the dataset's class names.
    """
    if image is None:
        if require_images:
            log.add(label_file, f"no image found for this label (expected {expected_image.name}); skipped")
            return None
        if label_size is None:
            log.add(label_file, "no image and no image size in the label; skipped")
            return None
        width, height = label_size
        path = expected_image
    else:
        try:
            width, height = image_size(image)
        except DataError as error:
            log.add(image, f"{str(error).removeprefix(f'{image}: ')}; skipped")
            return None
        if label_size is not None and label_size != (width, height):
            log.add(label_file, f"label gives image size {label_size[0]}x{label_size[1]} but "
                                f"{image.name} is {width}x{height}; using the image's size", kind="fixed")
        path = image
    boxes, labels = [], []
    for index, name, box in objects:
        cleaned = clean_box(label_file, index, box, width, height, log)
        if cleaned is not None:
            boxes.append(cleaned)
            labels.append(name)
    return Record(path=path, width=width, height=height, boxes=boxes, labels=labels,
                  source=source, original_name=label_file.name)
