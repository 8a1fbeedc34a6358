"""``load_dataset``: any supported dataset folder -> sorted records and the problems found.

Formats: ``neu-det`` (IMAGES/ + ANNOTATIONS/), ``gc10-det`` (a ``lable/`` folder),
``yolo`` (data.yaml or classes.txt), ``coco`` (json), ``voc`` (Annotations/ or XML beside
images). ``fmt="auto"`` tries them in that order, except that a VOC ``Annotations/``
folder wins over a stray json file.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metaldefect.data.coco import is_coco, read_coco
from metaldefect.data.gc10_det import is_gc10_det, read_gc10_det
from metaldefect.data.neu_det import is_neu_det, read_neu_det
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record
from metaldefect.data.voc import read_voc
from metaldefect.data.yolo import is_yolo, read_yolo
from metaldefect.errors import DataError

READERS: dict[str, Callable[[Path, ProblemLog, bool], list[Record]]] = {
    "neu-det": read_neu_det,
    "gc10-det": read_gc10_det,
    "voc": read_voc,
    "yolo": read_yolo,
    "coco": read_coco,
}
FORMATS = tuple(READERS)


def detect_format(root: str | Path) -> str:
    """The format of the dataset at ``root``; DataError if it matches none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if root.is_file():
        if is_coco(root):
            return "coco"
        raise DataError(f"{root}: a dataset is a folder or a COCO .json file")
    if is_neu_det(root):
        return "neu-det"
    if is_gc10_det(root):
        return "gc10-det"
    if is_yolo(root):
        return "yolo"
    if (root / "Annotations").is_dir():
        return "voc"
    if is_coco(root):
        return "coco"
    if next(root.rglob("*.xml"), None) is not None:
        return "voc"
    raise DataError(f"{root}: cannot tell the dataset format (expected IMAGES/+ANNOTATIONS/, lable/, "
                    "data.yaml or classes.txt, a COCO .json, or Pascal VOC .xml files)")


def load_dataset(root: str | Path, fmt: str = "auto", strict: bool = False,
                 require_images: bool = True) -> tuple[list[Record], ProblemLog]:
    """Read a dataset into records sorted by image path, and the problems found.

    Args:
        root: dataset folder (or COCO json file).
        fmt: "auto" or one of FORMATS.
        strict: raise DataError at the first problem instead of reporting and skipping.
        require_images: if False, a label whose image is missing still gives a record
            (path = where the image should be, size from the label), for label-only
            statistics; such records cannot be used for training.
    """
    root = Path(root)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise DataError(f"unknown dataset format '{fmt}' (choose from auto, {', '.join(FORMATS)})")
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    log = ProblemLog(strict=strict)
    records = READERS[fmt](root, log, require_images)
    return sorted(records, key=lambda record: record.path.as_posix()), log
