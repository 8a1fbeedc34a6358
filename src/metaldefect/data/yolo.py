"""YOLO labels: one ``<class> <cx> <cy> <w> <h>`` line per object, normalised to [0, 1].

Layout read (``read_yolo``): a class list in ``ROOT/data.yaml`` (``names:`` as a list or
an index->name mapping; ``data.yml`` too) or ``ROOT/classes.txt`` (one name per line);
images anywhere under ROOT; each image's label is found the Ultralytics way (the last
``images`` folder of its path replaced by ``labels``, suffix ``.txt``) or beside it.
An empty label file is an image with no defect. Pixel boxes need the image's size, so a
label whose image is missing cannot be read even for statistics.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from tqdm import tqdm

from metaldefect.data.checks import build_record, find_files
from metaldefect.data.images import IMAGE_SUFFIXES, image_size
from metaldefect.data.output import check_output_folder, image_depths, staged_output, unique_names
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record
from metaldefect.errors import DataError

CLASS_FILES = ("data.yaml", "data.yml", "classes.txt")


def is_yolo(root: Path) -> bool:
    return any((root / name).is_file() for name in CLASS_FILES)


def read_class_list(root: Path) -> list[str]:
    """The ordered class names of a YOLO dataset; DataError if there is no usable list."""
    for name in CLASS_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if name == "classes.txt":
                return [line.strip() for line in text.splitlines() if line.strip()]
            names = (yaml.safe_load(text) or {}).get("names")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as error:
            raise DataError(f"{path}: cannot read the class list ({error.__class__.__name__})") from None
        if isinstance(names, dict) and sorted(names) == list(range(len(names))):
            return [str(names[index]) for index in range(len(names))]
        if isinstance(names, list):
            return [str(item) for item in names]
        raise DataError(f"{path}: 'names' must be a list of class names or a mapping 0..N-1 -> name")
    raise DataError(f"{root}: no class list (expected one of {', '.join(CLASS_FILES)})")


def label_path_for(image: Path) -> list[Path]:
    """Where an image's label may be: the Ultralytics ``images`` -> ``labels`` swap, then beside it."""
    candidates = []
    parts = image.parts
    if "images" in parts:
        at = len(parts) - 1 - parts[::-1].index("images")
        candidates.append(Path(*parts[:at], "labels", *parts[at + 1:]).with_suffix(".txt"))
    candidates.append(image.with_suffix(".txt"))
    return candidates


def parse_yolo(path: Path, classes: list[str], width: int, height: int,
               log: ProblemLog) -> list[tuple[int, str, list[float]]] | None:
    """Objects of one label file in pixel ``xyxy``; bad lines reported and dropped; None if unreadable."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        log.add(path, f"cannot read label file ({error.__class__.__name__}); skipped")
        return None
    objects = []
    for index, line in enumerate(lines):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 5:
                raise ValueError
            class_id, (cx, cy, w, h) = int(fields[0]), map(float, fields[1:])
        except ValueError:
            log.add(path, f"line {index + 1}: expected '<class> <cx> <cy> <w> <h>', got '{line.strip()[:60]}'; dropped")
            continue
        if not 0 <= class_id < len(classes):
            log.add(path, f"line {index + 1}: unknown class {class_id} (the class list has {len(classes)}); dropped")
            continue
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        objects.append((index, classes[class_id], box))
    return objects


def read_yolo(root: Path, log: ProblemLog, require_images: bool = True) -> list[Record]:
    """Records of a YOLO dataset (layout in the module docstring)."""
    classes = read_class_list(root)
    label_files = set(find_files(root, [".txt"])) - {root / name for name in CLASS_FILES}
    records = []
    for image in tqdm(find_files(root, IMAGE_SUFFIXES), desc="reading yolo", unit="image", leave=False, disable=None):
        label = next((path for path in label_path_for(image) if path in label_files), None)
        if label is None:
            log.add(image, "image has no label file; skipped")
            continue
        label_files.discard(label)
        try:
            width, height = image_size(image)
        except DataError as error:
            log.add(image, f"{str(error).removeprefix(f'{image}: ')}; skipped")
            continue
        objects = parse_yolo(label, classes, width, height, log)
        if objects is not None:
            record = build_record(label, image, image, None, objects, "yolo", log, require_images)
            records.append(record)
    for label in sorted(label_files):
        if label.parent != root:  # text files at the top are image lists or notes, not labels
            log.add(label, "no image found for this label (YOLO boxes need the image's size); skipped")
    return records


def yolo_line(class_id: int, box: list[float], width: int, height: int) -> str:
    x1, y1, x2, y2 = box
    return (f"{class_id} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
            f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")


def write_yolo(records: list[Record], out_dir: str | Path, classes: list[str], overwrite: bool = False) -> None:
    """Write a YOLO folder: ``images/`` (copied byte for byte), ``labels/*.txt`` and ``data.yaml``.

    ``classes`` orders the class indices. The folder appears complete or not at all.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    index = {name: position for position, name in enumerate(classes)}
    for record in records:
        unknown = sorted(set(record.labels) - set(index))
        if unknown:
            raise DataError(f"{record.path}: class '{unknown[0]}' is not in the class list {list(classes)}")
    unique_names([record.path.stem for record in records], "label")
    image_depths(records)
    data = {"path": ".", "train": "images", "val": "images", "nc": len(classes), "names": list(classes)}
    with staged_output(out_dir) as staging:
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        for record in tqdm(records, desc="writing YOLO", unit="image", leave=False, disable=None):
            shutil.copyfile(record.path, staging / "images" / record.path.name)
            lines = [yolo_line(index[label], box, record.width, record.height)
                     for box, label in zip(record.boxes, record.labels)]
            (staging / "labels" / f"{record.path.stem}.txt").write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8")
        (staging / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
