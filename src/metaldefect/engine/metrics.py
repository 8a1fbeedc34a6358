"""Accumulating the paper's metrics over batches (and processes), and the confusion matrix.

Heads report each metric as a ``(sum, count)`` pair per batch (accuracy, cce, mse, mae,
slot_acc_all, slot_acc_real, ...); sums add across batches and processes, and the mean is
taken once at the end, so a metric never depends on how the data was batched or sharded.
"""
from __future__ import annotations

import math

import torch

from metaldefect.engine import distributed


class MetricSums:
    """``{name: (sum, count)}`` added batch by batch; :meth:`means` divides at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[float, float]] = {}

    def add(self, values: dict[str, tuple[float, float]]) -> None:
        for name, (value, count) in values.items():
            old_value, old_count = self.sums.get(name, (0.0, 0.0))
            self.sums[name] = (old_value + float(value), old_count + float(count))

    def add_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Loss terms are batch means: weight them by the batch size."""
        self.add({name: (float(value) * batch_size, batch_size) for name, value in losses.items()})

    def all_reduce(self) -> "MetricSums":
        self.sums = distributed.all_reduce_sums(self.sums)
        return self

    def means(self) -> dict[str, float]:
        return {name: (value / count if count else math.nan) for name, (value, count) in sorted(self.sums.items())}


class ConfusionMatrix:
    """Counts ``[true, predicted]`` over ``size`` labels (the classes, plus "no defect" for slot heads)."""

    def __init__(self, size: int) -> None:
        self.matrix = torch.zeros(size, size, dtype=torch.long)

    def update(self, true: torch.Tensor, predicted: torch.Tensor) -> None:
        size = self.matrix.shape[0]
        index = true.cpu().long() * size + predicted.cpu().long()
        self.matrix += torch.bincount(index, minlength=size * size).reshape(size, size)

    def all_reduce(self) -> "ConfusionMatrix":
        self.matrix = distributed.all_reduce_tensor(self.matrix)
        return self


def improved(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` for a metric to minimise ("min") or maximise ("max")."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best
