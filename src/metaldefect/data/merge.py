"""The paper's 11-class dataset (section III-A) from a NEU-DET root and a GC10-DET root.

Kept: the nine GC10-DET classes other than rolled_pit, plus NEU-DET inclusion (merged
into inclusion), rolled-in_scale (renamed rolled_in_scale) and scratches. Every other
object is excluded; an image left with no kept object is excluded.

Output (a Pascal VOC folder that ``load_dataset`` reads back):
  ``OUT/JPEGImages/<class> (<n>).<ext>``  images copied byte for byte
  ``OUT/Annotations/<class> (<n>).xml``   unified class names
  ``OUT/manifest.csv``                    every output file and its source, every excluded
                                           object and image and every problem, with reasons
An image holding several kept classes is named after its first kept object (XML order).
``<n>`` counts from 1 per class, NEU-DET images first, then GC10-DET, each in path order,
so the same inputs always give byte-identical outputs.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from metaldefect.data.gc10_det import GC10_CLASSES
from metaldefect.data.loading import load_dataset
from metaldefect.data.output import check_output_folder, image_depths, staged_output
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record
from metaldefect.data.voc import write_voc_files
from metaldefect.errors import DataError

PAPER_CLASSES = ("crease", "crescent_gap", "inclusion", "oil_spot", "punching_hole", "rolled_in_scale",
                 "scratches", "silk_spot", "waist_folding", "water_spot", "welding_line")
KEPT = {
    "neu-det": {"inclusion": "inclusion", "rolled-in_scale": "rolled_in_scale", "scratches": "scratches"},
    "gc10-det": {name: name for name in GC10_CLASSES if name != "rolled_pit"},
}
LABEL_FOLDERS = {"neu-det": "ANNOTATIONS", "gc10-det": "lable"}
MANIFEST_COLUMNS = ("status", "output", "dataset", "source", "class", "box", "reason")


@dataclass
class MergeResult:
    out_dir: Path
    images_per_class: dict[str, int]  # images named after each class
    boxes_per_class: dict[str, int]
    excluded_objects: Counter  # class -> objects excluded
    excluded_images: int
    problems: ProblemLog  # both datasets' problems, also listed in the manifest

    def text(self) -> str:
        """The report printed by ``metaldefect data merge``."""
        lines = [f"merged dataset: {self.out_dir} (manifest: {self.out_dir / 'manifest.csv'})",
                 f"{'class':<16}{'images':>8}{'boxes':>8}"]
        lines += [f"{name:<16}{self.images_per_class[name]:>8}{self.boxes_per_class[name]:>8}"
                  for name in PAPER_CLASSES]
        lines.append(f"{'total':<16}{sum(self.images_per_class.values()):>8}{sum(self.boxes_per_class.values()):>8}")
        lines.append("excluded objects: " + ", ".join(f"{name} {count}" for name, count
                                                      in sorted(self.excluded_objects.items())))
        lines.append(f"excluded images (no kept object): {self.excluded_images}")
        lines.append(f"problems (listed in the manifest): {len(self.problems)}")
        return "\n".join(lines)


def _relative(path: str | Path, root: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def _box(box: list[float]) -> str:
    return " ".join(f"{value:g}" for value in box)


def merge_paper_dataset(neu_root: str | Path, gc10_root: str | Path, out_dir: str | Path,
                        strict: bool = False, overwrite: bool = False) -> MergeResult:
    """Build the paper's 11-class dataset in ``out_dir`` (see the module docstring)."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    rows: list[dict] = []
    kept: list[tuple[str, Path, Record]] = []
    excluded_objects: Counter = Counter()
    excluded_images = 0
    problems = ProblemLog()
    for dataset, root in (("neu-det", Path(neu_root)), ("gc10-det", Path(gc10_root))):
        records, log = load_dataset(root, dataset, strict=strict)
        if not records:
            raise DataError(f"{root}: no usable {dataset} image ({len(log)} problems, e.g. {next(iter(log), 'none')})")
        problems.problems += log.problems
        rows += problem_rows(dataset, root, log)
        for record in records:
            label_file = f"{LABEL_FOLDERS[dataset]}/{record.original_name}"
            keep = [label in KEPT[dataset] for label in record.labels]
            for box, label, keep_it in zip(record.boxes, record.labels, keep):
                if not keep_it:
                    excluded_objects[label] += 1
                    rows.append({"status": "excluded_object", "dataset": dataset, "source": label_file,
                                 "class": label, "box": _box(box),
                                 "reason": f"{label} is not one of the paper's 11 classes"})
            if not any(keep):
                excluded_images += 1
                rows.append({"status": "excluded_image", "dataset": dataset, "source": _relative(record.path, root),
                             "class": ";".join(sorted(set(record.labels))), "reason": "no object of the 11 classes"})
                continue
            boxes = [box for box, keep_it in zip(record.boxes, keep) if keep_it]
            labels = [KEPT[dataset][label] for label, keep_it in zip(record.labels, keep) if keep_it]
            kept.append((dataset, root, record.with_objects(boxes, labels)))

    numbers: Counter = Counter()
    names = []
    for dataset, root, record in kept:
        name_class = record.labels[0]
        numbers[name_class] += 1
        name = f"{name_class} ({numbers[name_class]}){record.path.suffix.lower()}"
        names.append(name)
        rows.append({"status": "image", "output": f"JPEGImages/{name}", "dataset": dataset,
                     "source": _relative(record.path, root), "class": name_class})
        rows.append({"status": "annotation", "output": f"Annotations/{Path(name).stem}.xml", "dataset": dataset,
                     "source": f"{LABEL_FOLDERS[dataset]}/{record.original_name}", "class": name_class})
    records = [record for _, _, record in kept]
    depths = image_depths(records)
    with staged_output(out_dir) as staging:
        write_voc_files(records, staging, names, depths)
        (staging / "manifest.csv").write_text(manifest_csv(rows), encoding="utf-8", newline="")
    boxes = Counter(label for record in records for label in record.labels)
    return MergeResult(out_dir=out_dir, images_per_class={name: numbers[name] for name in PAPER_CLASSES},
                       boxes_per_class={name: boxes[name] for name in PAPER_CLASSES},
                       excluded_objects=excluded_objects, excluded_images=excluded_images, problems=problems)


def problem_rows(dataset: str, root: Path, log: ProblemLog) -> list[dict]:
    return [{"status": "problem" if problem.kind == "error" else "fixed", "dataset": dataset,
             "source": _relative(problem.file, root), "reason": problem.message} for problem in log]


def manifest_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
