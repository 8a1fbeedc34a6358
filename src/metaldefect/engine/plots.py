"""The run's figures, as the paper draws them: train against val curves per epoch, and a confusion matrix."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from metaldefect.atomic import atomic_path  # noqa: E402

# Panels in the paper's order (accuracy & loss, then MSE & MAE), then the slot head's extra ones.
CURVES = (
    ("accuracy", "Accuracy (slot heads: over real defects)"),
    ("loss", "Loss"),
    ("mse", "MSE (normalised boxes)"),
    ("mae", "MAE (normalised boxes)"),
    ("slot_acc_all", "Slot accuracy, all slots (authors')"),
    ("iou", "Mean IoU of assigned boxes"),
)


def _has_values(history: list[dict], key: str) -> bool:
    return any(isinstance(row.get(key), float) and not math.isnan(row[key]) for row in history)


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """``curves.png``: one panel per metric present, train and val against epoch."""
    panels = [(key, label) for key, label in CURVES
              if _has_values(history, f"train_{key}") or _has_values(history, f"val_{key}")]
    columns = 2
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(11, 3.6 * rows), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for axis, (key, label) in zip(axes.flat, panels):
        for split, style in (("train", "-"), ("val", "--")):
            if not _has_values(history, f"{split}_{key}"):  # no val line after a final fit
                continue
            values = [row.get(f"{split}_{key}", math.nan) for row in history]
            axis.plot(epochs, values, style, marker="o", markersize=3, label=split)
        axis.set_title(label)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_refiner_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """``refiner_curves.png``: the box refiner's losses, and the val IoU of jittered boxes before and after it."""
    figure, (losses, ious) = plt.subplots(1, 2, figsize=(11, 3.6))
    epochs = [row["epoch"] for row in history]
    for axis, lines, label in ((losses, (("train_loss", "train", "-"), ("val_loss", "val", "--")), "Loss (smooth L1)"),
                               (ious, (("val_iou_before", "val, jittered", ":"),
                                       ("val_iou_after", "val, refined", "--")), "Mean IoU with the labelled box")):
        for key, name, style in lines:
            if _has_values(history, key):  # no val lines after a final fit
                axis.plot(epochs, [row.get(key, math.nan) for row in history], style, marker="o", markersize=3,
                          label=name)
        axis.set_title(label)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
        else:
            axis.text(0.5, 0.5, "no val images (a final fit)", ha="center", va="center", transform=axis.transAxes)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_confusion(matrix: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> None:
    """``confusion.png``: counts with rows = true class, columns = predicted class."""
    matrix = np.asarray(matrix)
    size = len(labels)
    figure, axis = plt.subplots(figsize=(1.0 + 0.75 * size, 0.8 + 0.7 * size))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # colour by row share, print counts
    axis.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    for i in range(size):
        for j in range(size):
            axis.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                      color="white" if shown[i, j] > 0.5 else "black", fontsize=8)
    axis.set_xticks(range(size), labels, rotation=45, ha="right")
    axis.set_yticks(range(size), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if title:
        axis.set_title(title)
    figure.tight_layout()
    _save(figure, path)


def _save(figure, path: str | Path) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(figure)
