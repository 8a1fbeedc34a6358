"""Hungarian matching of predicted slots to true objects (DETR's matcher, for the slot head).

Each image's cost matrix ``[K slots, N objects]`` is
``cost_class * -p(true class) + cost_box * L1(boxes) + cost_giou * -GIoU(boxes)``;
scipy's ``linear_sum_assignment`` gives the cheapest one-to-one assignment. Slots left
unmatched are trained as "no defect". (It lives in models/, beside the head whose loss
uses it, as DETR's does: the engine layer sits above the models.)
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from metaldefect.models.heads.blocks import well_formed


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of slots to objects.

    Args:
        cost_class: weight of the negative class probability.
        cost_box: weight of the L1 distance between normalised xyxy boxes.
        cost_giou: weight of the negative generalised IoU.
    """

    def __init__(self, cost_class: float = 1.0, cost_box: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_box == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_box = cost_box
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's slots to its objects.

        Args:
            outputs: ``{"logits": [B, K, C + 1], "boxes": [B, K, 4]}`` (normalised xyxy).
            targets: per image ``{"labels": [N], "boxes": [N, 4]}``.

        Returns:
            per image ``(slot_indices [n], object_indices [n])``, ``n = min(K, N)``, sorted by slot.
        """
        probs = outputs["logits"].float().softmax(-1).cpu()
        boxes = well_formed(outputs["boxes"].float().cpu())
        matches = []
        for prob, pred, target in zip(probs, boxes, targets):
            labels, true = target["labels"].cpu(), target["boxes"].float().cpu()
            if len(labels) == 0:
                empty = torch.empty(0, dtype=torch.long)
                matches.append((empty, empty))
                continue
            cost = (self.cost_class * -prob[:, labels]
                    + self.cost_box * torch.cdist(pred, true, p=1)
                    + self.cost_giou * -generalized_box_iou(pred, true))
            slots, objects = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(slots, dtype=torch.long), torch.as_tensor(objects, dtype=torch.long)))
        return matches
