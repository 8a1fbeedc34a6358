"""COCO mAP of a detecting head over the batches of one evaluation pass (logged every epoch).

With it, ``train.monitor: map50`` (or ``map``, mode ``max``) picks the checkpoint that
detects best, not the one with the lowest loss. Targets carry normalised boxes and each
image's original ``size``; boxes go back to pixels so that the numbers are those
``metaldefect evaluate`` reports for the same weights (same decode, same pycocotools matching; only the
headline numbers are computed, :func:`~metaldefect.engine.coco_eval.coco_map`). A bf16 run's epochs run
the forward pass in bf16, so their figures can differ from float32's in the third decimal.
"""
from __future__ import annotations

from pathlib import Path

from metaldefect.data.records import Record
from metaldefect.engine import distributed
from metaldefect.engine.coco_eval import coco_map


class DetectionCollector:
    """Decode every batch at score threshold 0 and keep the ground truth beside it."""

    def __init__(self, head):
        self.head = head
        # The engine knows class indices only; any distinct names give the same mAP.
        self.names = [str(k) for k in range(head.num_classes)]
        self.records: list[Record] = []
        self.detections: list = []

    def add(self, outputs: dict, targets: list[dict]) -> None:
        """``targets``: per image ``{"boxes": [N, 4] normalised xyxy, "labels": [N], "size": (w, h)}``."""
        sizes = [tuple(target["size"]) for target in targets]
        self.detections += self.head.decode(outputs, sizes, self.names)
        for target, (width, height) in zip(targets, sizes):
            boxes = (target["boxes"] * target["boxes"].new_tensor([width, height, width, height])).tolist()
            self.records.append(Record(path=Path(f"image-{len(self.records)}"), width=width, height=height,
                                       boxes=boxes, labels=[self.names[k] for k in target["labels"].tolist()]))

    def result(self) -> dict[str, float]:
        """``{"map50": ..., "map": ...}`` over the images of every process (0.0 when undefined; {} without images)."""
        records = distributed.all_gather_list(self.records)
        detections = distributed.all_gather_list(self.detections)
        if not records:
            return {}
        map50, map_ = coco_map(records, detections, self.names)
        return {"map50": map50 or 0.0, "map": map_ or 0.0}
