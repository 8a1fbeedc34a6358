"""The one record type every reader produces and every writer consumes.

Boxes are absolute pixel ``xyxy`` floats in the image's own size; normalised
coordinates exist only inside encoders. Class names are strings here: a run's
class vocabulary maps them to indices later.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass
class Record:
    """One annotated image.

    Attributes:
        path: the image file (may not exist, e.g. a label file whose image is missing).
        width, height: image size in pixels, as labelled or as read from the image.
        boxes: ``[[xmin, ymin, xmax, ymax], ...]`` absolute pixels, floats.
        labels: one class name per box.
        source: dataset the record came from (``"neu-det"``, ``"gc10-det"``, ``"voc"``...).
        original_name: file name of the label (or image) in the source dataset.
    """

    path: Path
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    source: str = ""
    original_name: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.path}: {len(self.boxes)} boxes but {len(self.labels)} labels")

    @property
    def stem(self) -> str:
        return self.path.stem

    def with_objects(self, boxes: list[list[float]], labels: list[str]) -> "Record":
        """A copy of this record holding other objects."""
        return replace(self, boxes=[list(b) for b in boxes], labels=list(labels))


@dataclass
class Detection:
    """One predicted object: absolute pixel ``xyxy`` box, class name and score in [0, 1]."""

    box: list[float]
    label: str
    score: float

    def to_dict(self) -> dict:
        return {"label": self.label, "score": round(float(self.score), 4),
                "box": [round(float(v), 1) for v in self.box]}
