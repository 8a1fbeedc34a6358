"""Image classifier head (paper III-B): features -> Dense path -> C-way softmax.

The paper's custom CNN classifier is ``Flatten -> Dense 512 -> Dropout .3 -> Dense 256 ->
Dropout .3 -> Dense C`` on the conv features (``inputs: map, hidden: [512, 256],
dropout: 0.3``); its InceptionV3 classifier is ``GAP -> Dense C`` (``inputs: pooled``).
The two-class experiments are the same head with C = 2.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaldefect.data.encoders import encode_image_labels
from metaldefect.models.heads import register_head
from metaldefect.models.heads.blocks import FeatureInput, mlp, mlp_width


@register_head("classifier")
class ClassifierHead(nn.Module):
    """Whole-image class.

    Args:
        in_dims: the backbone's feature dims (see FeatureInput).
        num_classes: C.
        inputs, grid: which features to flatten (FeatureInput).
        hidden: widths of the Dense layers before the output; dropout: rate(s) after them.
        label_smoothing: for the cross-entropy loss (0 = the paper's plain CCE).
    """

    task = "classify"

    def __init__(self, in_dims: dict, num_classes: int, inputs: str = "pooled", grid: int | None = None,
                 hidden: Sequence[int] = (), dropout: float | Sequence[float] = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.input = FeatureInput(in_dims, inputs, grid)
        self.body = mlp(self.input.out_dim, hidden, dropout)
        self.classify = nn.Linear(mlp_width(self.input.out_dim, hidden), num_classes)

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        """-> ``{"logits": [B, C]}``."""
        return {"logits": self.classify(self.body(self.input(features)))}

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        labels = encode_image_labels(targets).to(outputs["logits"].device)
        loss = F.cross_entropy(outputs["logits"], labels, ignore_index=-1, label_smoothing=self.label_smoothing)
        return {"loss": loss, "loss_cls": loss.detach()}

    @torch.no_grad()
    def metrics(self, outputs: dict, targets: list[dict]) -> dict[str, tuple[float, float]]:
        """accuracy and cce (categorical cross-entropy), over images with a label."""
        labels = encode_image_labels(targets).to(outputs["logits"].device)
        known = labels >= 0
        logits, labels = outputs["logits"][known], labels[known]
        count = float(len(labels))
        correct = (logits.argmax(1) == labels).sum().item()
        cce = F.cross_entropy(logits, labels, reduction="sum").item() if count else 0.0
        return {"accuracy": (correct, count), "cce": (cce, count)}

    @torch.no_grad()
    def confusion(self, outputs: dict, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(true [M], predicted [M])`` class indices for the confusion matrix."""
        labels = encode_image_labels(targets).to(outputs["logits"].device)
        known = labels >= 0
        return labels[known], outputs["logits"][known].argmax(1)

    @torch.no_grad()
    def decode(self, outputs: dict, image_sizes: list[tuple[int, int]], classes: list[str],
               score_threshold: float = 0.0) -> list[list[tuple[str, float]]]:
        """Per image, ``[(class name, probability), ...]`` sorted by probability, those >= threshold."""
        probs = outputs["logits"].float().softmax(-1).cpu()
        results = []
        for row in probs:
            order = row.argsort(descending=True).tolist()
            results.append([(classes[i], float(row[i])) for i in order if row[i] >= score_threshold])
        return results
