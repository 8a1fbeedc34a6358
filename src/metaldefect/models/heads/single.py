"""Single-defect detector head (paper III-C): one class and one box per image.

Shared features feed two paths, as in the paper's Fig. 4: a class path
``Dense 128 -> Dense 64 -> Dense C`` (softmax) and a box path ``Dense 128 -> Dense 64 ->
Dense 4`` (linear). Trained on the first object of each image (the paper's assumption of
one defect per image) with categorical cross-entropy plus MSE on the normalised box.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from metaldefect.data.encoders import encode_first_object
from metaldefect.data.records import Detection
from metaldefect.models.heads import register_head
from metaldefect.models.heads.blocks import FeatureInput, mlp, mlp_width, well_formed

BOX_ACTIVATIONS = ("none", "sigmoid")


@register_head("single")
class SingleDefectHead(nn.Module):
    """One defect per image.

    Args:
        in_dims, num_classes, inputs, grid: as for the classifier.
        shared: Dense widths shared by both paths before they split (the paper: none).
        class_layers, box_layers: hidden widths of the class and box paths; dropout: rate(s) in both.
        box_activation: "none" (the paper's linear output) or "sigmoid" (boxes kept in [0, 1]).
        cls_weight, box_weight: loss = cls_weight * CCE + box_weight * MSE.
    """

    task = "detect"

    def __init__(self, in_dims: dict, num_classes: int, inputs: str = "pooled", grid: int | None = None,
                 shared: Sequence[int] = (), class_layers: Sequence[int] = (128, 64),
                 box_layers: Sequence[int] = (128, 64), dropout: float = 0.0, box_activation: str = "none",
                 cls_weight: float = 1.0, box_weight: float = 1.0):
        super().__init__()
        if box_activation not in BOX_ACTIVATIONS:
            raise ValueError(f"box_activation {box_activation!r} is not one of {BOX_ACTIVATIONS}")
        self.num_classes = num_classes
        self.box_activation = box_activation
        self.cls_weight = cls_weight
        self.box_weight = box_weight
        self.input = FeatureInput(in_dims, inputs, grid)
        self.shared = mlp(self.input.out_dim, shared, dropout)
        width = mlp_width(self.input.out_dim, shared)
        self.class_path = mlp(width, class_layers, dropout, out_dim=num_classes)
        self.box_path = mlp(width, box_layers, dropout, out_dim=4)

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        """-> ``{"logits": [B, C], "boxes": [B, 4]}`` (boxes normalised xyxy)."""
        shared = self.shared(self.input(features))
        boxes = self.box_path(shared)
        if self.box_activation == "sigmoid":
            boxes = boxes.sigmoid()
        return {"logits": self.class_path(shared), "boxes": boxes}

    def _encode(self, outputs: dict, targets: list[dict]):
        labels, boxes, present = encode_first_object(targets)
        device = outputs["logits"].device
        return labels.to(device), boxes.to(device), present.to(device)

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        labels, boxes, present = self._encode(outputs, targets)
        if present.any():
            loss_cls = F.cross_entropy(outputs["logits"][present], labels[present])
            loss_box = F.mse_loss(outputs["boxes"][present], boxes[present])
        else:
            loss_cls = loss_box = outputs["logits"].sum() * 0.0
        loss = self.cls_weight * loss_cls + self.box_weight * loss_box
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach()}

    @torch.no_grad()
    def metrics(self, outputs: dict, targets: list[dict]) -> dict[str, tuple[float, float]]:
        """accuracy, cce over images with an object; mse, mae (per coordinate) and iou of the first box."""
        labels, boxes, present = self._encode(outputs, targets)
        logits, predicted = outputs["logits"][present], outputs["boxes"][present].float()
        labels, boxes = labels[present], boxes[present]
        count = float(len(labels))
        if not count:
            return {name: (0.0, 0.0) for name in ("accuracy", "cce", "mse", "mae", "iou")}
        error = predicted - boxes
        iou = box_iou(well_formed(predicted), boxes).diagonal()
        return {
            "accuracy": ((logits.argmax(1) == labels).sum().item(), count),
            "cce": (F.cross_entropy(logits, labels, reduction="sum").item(), count),
            "mse": (error.pow(2).sum().item(), count * 4),
            "mae": (error.abs().sum().item(), count * 4),
            "iou": (iou.sum().item(), count),
        }

    @torch.no_grad()
    def confusion(self, outputs: dict, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        labels, _, present = self._encode(outputs, targets)
        return labels[present], outputs["logits"][present].argmax(1)

    @torch.no_grad()
    def decode(self, outputs: dict, image_sizes: list[tuple[int, int]], classes: list[str],
               score_threshold: float = 0.0) -> list[list[Detection]]:
        """One detection per image (none if its class probability is below the threshold), pixel xyxy."""
        probs = outputs["logits"].float().softmax(-1).cpu()
        boxes = well_formed(outputs["boxes"].float().cpu()).clamp(0.0, 1.0)
        results = []
        for row, box, (width, height) in zip(probs, boxes, image_sizes):
            score, index = row.max(0)
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            keep = float(score) >= score_threshold
            results.append([Detection((box * scale).tolist(), classes[int(index)], float(score))] if keep else [])
        return results

