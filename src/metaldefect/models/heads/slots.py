"""Multi-defect slot head (paper III-D, III-E): K slots, each a class (or "no defect") and a box.

Two Dense paths on shared features: a class path ending in ``K x (C + 1)`` units with a
softmax PER SLOT (the authors' notebook ran one softmax over all 132 units, a bug not
copied here), and a box path ending in ``K x 4``. Defaults are the paper's ViT head:
class 1024-512-512-256, box 128-Dropout.2-128-Dropout.2-64-64, loss CCE 1.0 + MSE 0.5.

Slots are trained one of two ways (``matching``):
- "ordered" (the paper): slot i holds object i in label-file order, the rest are padding
  with class "no defect". The class loss covers every slot (padding teaches "no defect");
  the box loss covers real slots only. We differ from the paper here on purpose: it
  regressed padding boxes to zeros, which spends the box path's capacity on a constant
  that the class "no defect" already says. ``mse_all`` / ``mae_all`` still report the
  paper's padded errors for comparison.
- "hungarian" (order-free, DETR style): slots are matched to objects by
  :class:`HungarianMatcher` (class probability + L1 + GIoU costs); unmatched slots learn "no defect".

Metrics follow whichever assignment the head trains with: ``slot_acc_all`` is the
authors' accuracy over all K slots, padding included (an all-"no defect" model scores
about 1 - mean objects / K); ``slot_acc_real`` is over real defects only, and is what
``accuracy`` means for this head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from metaldefect.data.records import Detection
from metaldefect.models.heads import register_head
from metaldefect.models.heads.blocks import FeatureInput, mlp, mlp_width, well_formed
from metaldefect.models.matcher import HungarianMatcher

MATCHINGS = ("ordered", "hungarian")
BOX_PARAMS = ("xyxy", "cxcywh")
BOX_ACTIVATIONS = ("none", "sigmoid")
BOX_LOSSES = ("mse", "l1")


@register_head("slots")
class SlotHead(nn.Module):
    """K slots x (C + 1) classes and K x 4 boxes.

    Args:
        in_dims, num_classes, inputs, grid: as for the classifier.
        num_slots: K, the most objects one image holds in the data (11 in the paper's set).
        shared: Dense widths before the two paths split (the paper: none, just Flatten).
        class_layers, class_dropout: the class path's hidden widths and dropout rate(s).
        box_layers, box_dropout: the box path's hidden widths and dropout rate(s).
        matching: "ordered" or "hungarian" (see module docstring).
        box_param: the 4 box outputs are "xyxy" corners (the paper) or "cxcywh" (center, size; DETR).
        box_activation: "none" (the paper's linear output) or "sigmoid" (in [0, 1]).
        box_loss: "mse" (the paper) or "l1"; giou_weight adds ``1 - GIoU`` on real slots.
        cls_weight, box_weight, giou_weight: loss weights.
        no_defect_weight: class weight of "no defect" in the cross-entropy (DETR uses 0.1).
        match_class, match_box, match_giou: Hungarian costs (hungarian only).
    """

    task = "detect"

    def __init__(self, in_dims: dict, num_classes: int, num_slots: int, inputs: str = "pooled",
                 grid: int | None = None, shared: Sequence[int] = (),
                 class_layers: Sequence[int] = (1024, 512, 512, 256), class_dropout: float | Sequence[float] = 0.0,
                 box_layers: Sequence[int] = (128, 128, 64, 64),
                 box_dropout: float | Sequence[float] = (0.2, 0.2, 0.0, 0.0),
                 matching: str = "ordered", box_param: str = "xyxy", box_activation: str = "none",
                 box_loss: str = "mse", cls_weight: float = 1.0, box_weight: float = 0.5, giou_weight: float = 0.0,
                 no_defect_weight: float = 1.0, match_class: float = 1.0, match_box: float = 5.0,
                 match_giou: float = 2.0):
        super().__init__()
        for name, value, options in (("matching", matching, MATCHINGS), ("box_param", box_param, BOX_PARAMS),
                                     ("box_activation", box_activation, BOX_ACTIVATIONS),
                                     ("box_loss", box_loss, BOX_LOSSES)):
            if value not in options:
                raise ValueError(f"{name} {value!r} is not one of {options}")
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive integer, got {num_slots!r}")
        self.num_classes = num_classes
        self.num_slots = num_slots
        self.matching = matching
        self.box_param = box_param
        self.box_activation = box_activation
        self.box_loss = box_loss
        self.cls_weight, self.box_weight, self.giou_weight = cls_weight, box_weight, giou_weight
        self.matcher = HungarianMatcher(match_class, match_box, match_giou) if matching == "hungarian" else None
        class_weights = torch.ones(num_classes + 1)
        class_weights[num_classes] = no_defect_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

        self.input = FeatureInput(in_dims, inputs, grid)
        self.shared = mlp(self.input.out_dim, shared)
        width = mlp_width(self.input.out_dim, shared)
        self.class_path = mlp(width, class_layers, class_dropout, out_dim=num_slots * (num_classes + 1))
        self.box_path = mlp(width, box_layers, box_dropout, out_dim=num_slots * 4)

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        """-> ``{"logits": [B, K, C + 1], "boxes": [B, K, 4]}``; boxes normalised xyxy, "no defect" = index C."""
        shared = self.shared(self.input(features))
        batch = shared.shape[0]
        logits = self.class_path(shared).view(batch, self.num_slots, self.num_classes + 1)
        boxes = self.box_path(shared).view(batch, self.num_slots, 4)
        if self.box_activation == "sigmoid":
            boxes = boxes.sigmoid()
        if self.box_param == "cxcywh":
            boxes = box_convert(boxes, "cxcywh", "xyxy")
        return {"logits": logits, "boxes": boxes}

    def assign(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image ``(slot_indices, object_indices)``: in order, or by the Hungarian matcher."""
        if self.matcher is not None:
            return self.matcher(outputs, targets)
        pairs = []
        for target in targets:
            count = len(target["labels"])
            if count > self.num_slots:
                raise ValueError(f"an image holds {count} objects but the head has only {self.num_slots} slots")
            index = torch.arange(count)
            pairs.append((index, index))
        return pairs

    def _targets(self, outputs: dict, targets: list[dict]):
        """Assigned targets: slot classes ``[B, K]``, real-slot mask ``[B, K]``, padded boxes ``[B, K, 4]``."""
        logits = outputs["logits"]
        batch, device = logits.shape[0], logits.device
        classes = torch.full((batch, self.num_slots), self.num_classes, dtype=torch.long, device=device)
        boxes = torch.zeros(batch, self.num_slots, 4, device=device)
        for i, (slots, objects) in enumerate(self.assign(outputs, targets)):
            classes[i, slots.to(device)] = targets[i]["labels"].to(device)[objects.to(device)]
            boxes[i, slots.to(device)] = targets[i]["boxes"].to(device)[objects.to(device)].float()
        return classes, classes != self.num_classes, boxes

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        classes, real, true_boxes = self._targets(outputs, targets)
        logits = outputs["logits"]
        loss_cls = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), weight=self.class_weights.to(logits.device))
        if real.any():
            predicted, true = outputs["boxes"][real], true_boxes[real]
            box_fn = F.mse_loss if self.box_loss == "mse" else F.l1_loss
            loss_box = box_fn(predicted, true)
            loss_giou = (1.0 - generalized_box_iou(well_formed(predicted), true).diagonal()).mean()
        else:
            loss_box = loss_giou = outputs["boxes"].sum() * 0.0
        loss = self.cls_weight * loss_cls + self.box_weight * loss_box
        if self.giou_weight:
            loss = loss + self.giou_weight * loss_giou
        return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(),
                "loss_giou": loss_giou.detach()}

    @torch.no_grad()
    def metrics(self, outputs: dict, targets: list[dict]) -> dict[str, tuple[float, float]]:
        """slot_acc_all, slot_acc_real (= accuracy), cce over all slots; mse, mae, iou over real slots;
        mse_all, mae_all over all slots with padding boxes zero (the authors' definition)."""
        classes, real, true_boxes = self._targets(outputs, targets)
        logits, boxes = outputs["logits"].float(), outputs["boxes"].float()
        correct = logits.argmax(-1) == classes
        slots, reals = float(classes.numel()), float(real.sum())
        error = boxes[real] - true_boxes[real]
        padded_error = boxes - true_boxes
        iou = box_iou(well_formed(boxes[real]), true_boxes[real]).diagonal() if reals else torch.zeros(0)
        return {
            "accuracy": (correct[real].sum().item(), reals),
            "slot_acc_real": (correct[real].sum().item(), reals),
            "slot_acc_all": (correct.sum().item(), slots),
            "cce": (F.cross_entropy(logits.flatten(0, 1), classes.flatten(), reduction="sum").item(), slots),
            "mse": (error.pow(2).sum().item(), reals * 4),
            "mae": (error.abs().sum().item(), reals * 4),
            "iou": (iou.sum().item(), reals),
            "mse_all": (padded_error.pow(2).sum().item(), slots * 4),
            "mae_all": (padded_error.abs().sum().item(), slots * 4),
        }

    @torch.no_grad()
    def confusion(self, outputs: dict, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(true [B*K], predicted [B*K])`` per slot; index C is "no defect"."""
        classes, _, _ = self._targets(outputs, targets)
        return classes.flatten(), outputs["logits"].argmax(-1).flatten()

    @torch.no_grad()
    def decode(self, outputs: dict, image_sizes: list[tuple[int, int]], classes: list[str],
               score_threshold: float = 0.0) -> list[list[Detection]]:
        """Per image, one detection per slot whose best real-class probability is >= the threshold.

        Score = that probability (so with threshold 0 every slot comes back, ranked, as mAP needs;
        with a threshold >= 0.5 a slot whose argmax is "no defect" never passes). Pixel xyxy boxes.
        """
        probs = outputs["logits"].float().softmax(-1)[..., : self.num_classes].cpu()
        boxes = well_formed(outputs["boxes"].float().cpu()).clamp(0.0, 1.0)
        results = []
        for prob, box, (width, height) in zip(probs, boxes, image_sizes):
            scores, labels = prob.max(-1)
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            keep = (scores >= score_threshold).nonzero().flatten().tolist()
            detections = [Detection((box[k] * scale).tolist(), classes[int(labels[k])], float(scores[k]))
                          for k in keep]
            results.append(sorted(detections, key=lambda d: -d.score))
        return results
