"""Tiny synthetic datasets on disk for the data-layer tests (test_data_*.py)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from PIL import Image


def make_image(path: Path, width: int = 64, height: int = 48, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), 128).save(path)
    return path


def voc_text(filename: str, objects: list[tuple[str, list[float]]], width: int = 64, height: int = 48,
             folder: str = "images") -> str:
    parts = [f"<annotation><folder>{folder}</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>1</depth></size>"]
    for name, (x1, y1, x2, y2) in objects:
        parts.append(f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>\n"


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def neu_dataset(root: Path, items: dict[str, list[tuple[str, list[float]]]], size: int = 200) -> Path:
    """NEU-DET layout: ``{stem: [(class, box), ...]}`` -> IMAGES/stem.jpg + ANNOTATIONS/stem.xml."""
    for stem, objects in items.items():
        make_image(root / "IMAGES" / f"{stem}.jpg", size, size)
        write_text(root / "ANNOTATIONS" / f"{stem}.xml", voc_text(f"{stem}.jpg", objects, size, size))
    return root


def gc10_placeholders(labels: Path, root: Path, stems: list[str] | None = None) -> Path:
    """A GC10-DET root: ``lable/`` copied from ``labels`` (all, or ``stems``), and one cheap
    2048x1000 placeholder PNG (4 kB) linked into the class folder each label names."""
    root.mkdir(parents=True, exist_ok=True)
    source = make_image(root / "placeholder.bin.png", 2048, 1000)
    placeholder = source.rename(root / "placeholder.bin")  # not an image suffix: not found as a dataset image
    files = sorted(labels.glob("*.xml")) if stems is None else [labels / f"{stem}.xml" for stem in stems]
    (root / "lable").mkdir()
    for label in files:
        shutil.copyfile(label, root / "lable" / label.name)
        folder = re.search(r"<folder>(.*?)</folder>", label.read_text()).group(1)
        (root / folder).mkdir(exist_ok=True)
        (root / folder / f"{label.stem}.png").symlink_to(placeholder)
    return root


def coco_json(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    return write_text(path, json.dumps({"images": images, "annotations": annotations, "categories": categories}))
