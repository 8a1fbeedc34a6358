"""COCO detection json: ``images``, ``annotations`` (``bbox`` = ``[x, y, width, height]``), ``categories``.

Read (``read_coco``): ROOT is a json file, or a folder whose ``*.json`` and
``annotations/*.json`` files are read. An image's ``file_name`` is looked up relative to
the json's folder, then its ``images/`` subfolder, then ROOT and ``ROOT/images``. An image
listed with no annotation is an image with no defect.

Written (``write_coco``): one json; images are referenced, not copied: ``file_name`` is
the image's path relative to the json's folder. Category ids start at 1 in class order.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from metaldefect.atomic import write_text
from metaldefect.data.checks import build_record
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record
from metaldefect.errors import DataError


def coco_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))


def is_coco(root: Path) -> bool:
    return bool(coco_files(root)) if root.is_dir() else root.suffix.lower() == ".json"


def load_coco_json(path: Path, log: ProblemLog) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.add(path, f"cannot read COCO json ({error.__class__.__name__}: {error}); skipped")
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list)
                                             for key in ("images", "annotations", "categories")):
        log.add(path, "not a COCO detection file (needs 'images', 'annotations' and 'categories' lists); skipped")
        return None
    return data


def find_image(file_name: str, json_file: Path, root: Path) -> Path | None:
    folder = root if root.is_dir() else root.parent
    for base in (json_file.parent, json_file.parent / "images", folder, folder / "images"):
        if (base / file_name).is_file():
            return base / file_name
    return None


def read_coco_file(path: Path, root: Path, log: ProblemLog, require_images: bool) -> list[Record]:
    data = load_coco_json(path, log)
    if data is None:
        return []
    try:
        categories = {item["id"]: str(item["name"]) for item in data["categories"]}
        images = {item["id"]: (str(item["file_name"]), item.get("width"), item.get("height"))
                  for item in data["images"]}
    except (TypeError, KeyError) as error:
        log.add(path, f"a category or image entry lacks {error}; skipped")
        return []
    objects: dict[object, list[tuple[int, str, list[float]]]] = defaultdict(list)
    for number, annotation in enumerate(data["annotations"]):
        where = f"annotation {number + 1}"
        try:
            image_id, category_id, (x, y, w, h) = annotation["image_id"], annotation["category_id"], annotation["bbox"]
            box = [float(x), float(y), float(x) + float(w), float(y) + float(h)]
        except (TypeError, KeyError, ValueError):
            log.add(path, f"{where}: needs image_id, category_id and a bbox of four numbers; dropped")
            continue
        if image_id not in images:
            log.add(path, f"{where}: image id {image_id} is not listed in 'images'; dropped")
        elif category_id not in categories:
            log.add(path, f"{where}: unknown class (category id {category_id}); dropped")
        else:
            objects[image_id].append((len(objects[image_id]), categories[category_id], box))
    records = []
    for image_id, (file_name, width, height) in images.items():
        label = Path(f"{path}[{file_name}]")  # names the json and the image in every problem
        valid = isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
        size = (width, height) if valid else None
        record = build_record(label, find_image(file_name, path, root), path.parent / file_name, size,
                              objects[image_id], "coco", log, require_images)
        if record is not None:
            record.original_name = file_name
            records.append(record)
    return records


def read_coco(root: Path, log: ProblemLog, require_images: bool = True) -> list[Record]:
    """Records of every COCO json at ``root`` (a file or a folder; see the module docstring)."""
    files = coco_files(root)
    if not files:
        raise DataError(f"{root}: no COCO json file found")
    return [record for path in files for record in read_coco_file(path, root, log, require_images)]


def write_coco(records: list[Record], out_path: str | Path, classes: list[str]) -> None:
    """Write one COCO json referencing the records' images (written atomically)."""
    out_path = Path(out_path)
    category = {name: position + 1 for position, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        unknown = sorted(set(record.labels) - set(category))
        if unknown:
            raise DataError(f"{record.path}: class '{unknown[0]}' is not in the class list {list(classes)}")
        file_name = Path(os.path.relpath(os.path.abspath(record.path), os.path.abspath(out_path.parent))).as_posix()
        images.append({"id": image_id, "file_name": file_name, "width": record.width, "height": record.height})
        for box, label in zip(record.boxes, record.labels):
            x1, y1, x2, y2 = (round(value, 3) for value in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[label],
                                "bbox": [x1, y1, round(x2 - x1, 3), round(y2 - y1, 3)],
                                "area": round((x2 - x1) * (y2 - y1), 3), "iscrowd": 0})
    categories = [{"id": index, "name": name, "supercategory": "defect"} for name, index in category.items()]
    write_text(out_path, json.dumps({"images": images, "annotations": annotations, "categories": categories}) + "\n")
