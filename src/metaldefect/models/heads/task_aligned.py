"""Task-aligned assignment (TOOD, Feng et al., 2021; as used by YOLOv8 and YOLO11) for the dense head.

FCOS's assignment (:mod:`metaldefect.data.dense_targets`) is fixed by geometry: a box's
central points on the level that suits its size. Task-aligned assignment instead asks
the predictions: for every box, the candidate points (inside the box, or next to its
centre) are ranked by ``t = s^alpha * IoU^beta``, where ``s`` is the predicted
probability of the box's class and ``IoU`` that of the point's predicted box with the
box, and the ``top_k`` best on any level become positives. A point claimed by several
boxes keeps the one its prediction overlaps most. The class target of a positive is
``t`` rescaled per box so that its best point's target equals the best IoU any of its
points reached: the class score learns to rank points by how well they localise.

Written here because torchvision has no assigner and the libraries that do (mmdet,
ultralytics) are frameworks, not dependencies this package should carry.

Shapes: ``B`` images, ``L`` locations, ``K`` classes, ``M`` boxes of one image.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

from metaldefect.data.dense_targets import BACKGROUND


@torch.no_grad()
def task_aligned_targets(probabilities: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
                         strides: torch.Tensor, targets: list[dict], top_k: int = 10, alpha: float = 0.5,
                         beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classes, box-side distances and soft class targets for every location of a batch.

    Args:
        probabilities: ``[B, L, K]`` predicted class probabilities.
        boxes: ``[B, L, 4]`` predicted boxes, normalised xyxy.
        points, strides: ``[L, 2]`` normalised location centres and ``[L]`` normalised strides.
        targets: per image ``{"boxes": [M, 4] normalised xyxy, "labels": [M]}``.
        top_k: positives per box.
        alpha, beta: exponents of the class probability and of the IoU in the alignment metric
            (YOLOv8's 0.5 and 6.0).

    Returns:
        classes ``[B, L]`` long (``BACKGROUND`` where unassigned), ltrb ``[B, L, 4]`` distances
        from the point to its box's sides in strides, and scores ``[B, L]`` the soft class
        target (0 on background).
    """
    num_images, num_points = probabilities.shape[:2]
    device = probabilities.device
    classes = torch.full((num_images, num_points), BACKGROUND, dtype=torch.long, device=device)
    ltrb = torch.zeros(num_images, num_points, 4, device=device)
    scores = torch.zeros(num_images, num_points, device=device)
    x, y = points[:, 0:1], points[:, 1:2]                                          # [L, 1]
    for image, target in enumerate(targets):
        gt_boxes = target["boxes"].reshape(-1, 4).to(device, torch.float32)       # [M, 4]
        labels = target["labels"].reshape(-1).to(device, torch.long)              # [M]
        if len(labels) == 0:
            continue
        distances = torch.stack([x - gt_boxes[:, 0], y - gt_boxes[:, 1],
                                 gt_boxes[:, 2] - x, gt_boxes[:, 3] - y], dim=2)  # [L, M, 4]
        centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2                           # [M, 2]
        # Thin defects can fall between the points of a level: the points within half a
        # stride of a box's centre are candidates too, so every box has some on every level.
        near_centre = (((x - centre[:, 0]).abs() <= strides[:, None] / 2)
                       & ((y - centre[:, 1]).abs() <= strides[:, None] / 2))
        candidate = (distances.min(dim=2).values > 0) | near_centre                # [L, M]
        iou = box_iou(boxes[image], gt_boxes)                                      # [L, M]
        alignment = probabilities[image][:, labels].pow(alpha) * iou.pow(beta) * candidate
        top = alignment.topk(min(top_k, num_points), dim=0).indices                # [k, M]
        chosen = torch.zeros_like(candidate).scatter_(0, top, True) & candidate    # [L, M]
        # A point chosen by several boxes keeps the box its prediction overlaps most.
        owner = iou.masked_fill(~chosen, -1.0).argmax(dim=1)                       # [L]
        positive = chosen.any(dim=1)                                               # [L]
        chosen = chosen & (torch.arange(len(labels), device=device)[None, :] == owner[:, None])
        alignment = alignment * chosen
        best_alignment = alignment.amax(dim=0).clamp(min=1e-9)                     # [M]
        best_iou = (iou * chosen).amax(dim=0)                                      # [M]
        normalised = (alignment * best_iou / best_alignment).amax(dim=1)           # [L]
        classes[image, positive] = labels[owner[positive]]
        ltrb[image, positive] = distances[positive, owner[positive]] / strides[positive, None]
        scores[image, positive] = normalised[positive]
    return classes, ltrb, scores
