"""Dataset statistics: label files, images, boxes per class, boxes per image, box sizes, problems.

Labels are counted even where images are missing (a GC10-DET root holding only ``lable/``):
then sizes come from the labels. A label whose image is missing is a problem, except when
no image at all is present: that is reported once as label-only statistics.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metaldefect.data.loading import detect_format, load_dataset
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record


@dataclass
class DatasetStats:
    root: str
    format: str
    label_files: int
    images: int
    boxes_per_class: dict[str, int]
    boxes_per_image: dict[int, int]  # number of boxes -> number of images with that many
    box_sizes: np.ndarray = field(repr=False)  # [num_boxes, 4]: width, height (px), area fraction, aspect w/h
    problems: ProblemLog = field(repr=False)

    @property
    def boxes(self) -> int:
        return sum(self.boxes_per_class.values())

    @property
    def label_only(self) -> bool:
        return self.images == 0 and self.label_files > 0

    def text(self) -> str:
        """The summary printed by ``metaldefect data stats``."""
        lines = [f"dataset: {self.root} ({self.format})",
                 f"label files: {self.label_files}",
                 f"images: {self.images}" + ("  (no images found: statistics from the labels only)"
                                             if self.label_only else ""),
                 f"boxes: {self.boxes}", "boxes per class:"]
        width = max((len(name) for name in self.boxes_per_class), default=0)
        lines += [f"  {name:<{width}}  {count}" for name, count in self.boxes_per_class.items()]
        lines.append("boxes per image (boxes: images): "
                     + ", ".join(f"{boxes}: {images}" for boxes, images in self.boxes_per_image.items()))
        if len(self.box_sizes):
            lines.append("box size              min    median      mean       max")
            for column, name in enumerate(("width px", "height px", "area / image", "aspect w/h")):
                values = self.box_sizes[:, column]
                lines.append(f"  {name:<14}" + "".join(f"{v:>10.4g}" for v in
                                                        (values.min(), np.median(values), values.mean(), values.max())))
        fixed = sum(problem.kind == "fixed" for problem in self.problems)
        lines.append(f"problems: {len(self.problems)} ({fixed} fixed, {len(self.problems) - fixed} skipped or dropped)")
        return "\n".join(lines)


def box_sizes(records: list[Record]) -> np.ndarray:
    """``[num_boxes, 4]``: width, height, area as a fraction of the image, aspect ratio width/height."""
    rows = [[x2 - x1, y2 - y1, (x2 - x1) * (y2 - y1) / (record.width * record.height), (x2 - x1) / (y2 - y1)]
            for record in records for x1, y1, x2, y2 in record.boxes]
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def dataset_stats(root: str | Path, fmt: str = "auto", strict: bool = False) -> DatasetStats:
    """Read the dataset at ``root`` (labels counted even without images) and summarise it."""
    fmt = detect_format(root) if fmt == "auto" else fmt
    records, log = load_dataset(root, fmt, strict=strict, require_images=False)
    present = [record for record in records if record.path.is_file()]
    if present:
        for record in records:
            if not record.path.is_file():
                log.add(record.path, f"image not found for label {record.original_name}; counted in these "
                                     "statistics but not usable for training")
    classes = sorted({label for record in records for label in record.labels})
    counts = Counter(label for record in records for label in record.labels)
    return DatasetStats(
        root=str(root), format=fmt, label_files=len(records), images=len(present),
        boxes_per_class={name: counts[name] for name in classes},
        boxes_per_image=dict(sorted(Counter(len(record.boxes) for record in records).items())),
        box_sizes=box_sizes(records), problems=log)
