"""Targets: from a record to the generic target dict, and from targets to each head's tensors.

The generic target of one image (docs: heads contract) is a dict with
``"boxes"`` FloatTensor ``[N, 4]`` normalised xyxy in [0, 1] in the label file's order,
``"labels"`` LongTensor ``[N]`` (indices into the run's class vocabulary) and
``"size"`` the original ``(width, height)``. Each head encodes a batch of these itself
with one of the functions below: an image label, one box, or K padded slots.
"""
from __future__ import annotations

from collections import Counter

import torch

from metaldefect.data.records import Record
from metaldefect.errors import DataError


def image_label(labels: list[str]) -> str | None:
    """The class of a whole image: its most frequent object class, ties to the one listed first.

    NEU-DET and the paper's renamed set hold one class per image, where this is simply
    that class; ``None`` for an image without objects.
    """
    if not labels:
        return None
    counts = Counter(labels)
    return max(labels, key=lambda name: (counts[name], -labels.index(name)))


def make_target(record: Record, class_index: dict[str, int]) -> dict:
    """Record (absolute pixel boxes, class names) -> generic target with normalised boxes."""
    if record.width <= 0 or record.height <= 0:
        raise DataError(f"{record.path}: image size {record.width}x{record.height} is not positive")
    unknown = sorted(set(record.labels) - set(class_index))
    if unknown:
        raise DataError(f"{record.path}: class {unknown[0]!r} is not in the run's class list")
    scale = torch.tensor([record.width, record.height, record.width, record.height], dtype=torch.float32)
    boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4) / scale
    labels = torch.tensor([class_index[name] for name in record.labels], dtype=torch.long)
    return {"boxes": boxes.clamp(0.0, 1.0), "labels": labels, "size": (record.width, record.height)}


def encode_image_labels(targets: list[dict]) -> torch.Tensor:
    """Image-level class per target: ``[B]`` long, -1 for an image without objects (see image_label)."""
    out = []
    for target in targets:
        labels = target["labels"].tolist()
        out.append(-1 if not labels else image_label(labels))
    return torch.tensor(out, dtype=torch.long)


def encode_first_object(targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first object of each image, as the paper's single-defect model was trained.

    Returns ``labels [B]`` long (-1 when the image has no object), ``boxes [B, 4]``
    normalised xyxy (zeros when none) and ``present [B]`` bool.
    """
    batch = len(targets)
    labels = torch.full((batch,), -1, dtype=torch.long)
    boxes = torch.zeros(batch, 4)
    for i, target in enumerate(targets):
        if len(target["labels"]):
            labels[i] = target["labels"][0]
            boxes[i] = target["boxes"][0]
    return labels, boxes, labels >= 0


def encode_slots(targets: list[dict], num_slots: int,
                 no_defect: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K padded slots in the paper's order: objects first, then padding.

    Returns ``labels [B, K]`` long (padding = ``no_defect``, the extra class),
    ``boxes [B, K, 4]`` normalised xyxy (padding = zeros, as the paper padded) and
    ``real [B, K]`` bool marking slots that hold a real object.
    """
    batch = len(targets)
    labels = torch.full((batch, num_slots), no_defect, dtype=torch.long)
    boxes = torch.zeros(batch, num_slots, 4)
    for i, target in enumerate(targets):
        count = len(target["labels"])
        if count > num_slots:
            raise ValueError(f"an image holds {count} objects but the model has only {num_slots} slots")
        labels[i, :count] = target["labels"]
        boxes[i, :count] = target["boxes"]
    return labels, boxes, labels != no_defect
