"""Pictures of a DetectionReport: PR curves per class and the detection confusion matrix.

Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, safe in
threads and servers) and written atomically as PNG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from metaldefect.atomic import atomic_path
from metaldefect.engine.coco_eval import DetectionReport


def plot_pr_curves(report: DetectionReport, path: str | Path) -> None:
    """One precision-recall curve per class at IoU 0.5 (COCO's interpolated precision on
    its 101 recall points), the mean over classes in bold, AP@0.5 in the legend."""
    recall = np.asarray(report.recall_grid)
    palette = colormaps["tab10" if len(report.classes) <= 10 else "tab20"]
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.add_subplot()
    curves = []
    for k, (name, curve) in enumerate(zip(report.classes, report.pr_curves)):
        if curve is None:
            continue
        curves.append(curve)
        ax.plot(recall, curve, color=palette(k % palette.N), linewidth=1.4,
                label=f"{name}  AP50 {report.ap50[k]:.3f}")
    if curves:
        ax.plot(recall, np.mean(curves, axis=0), color="black", linewidth=3,
                label=f"all classes  mAP50 {report.map50:.3f}")
    missing = [name for name, curve in zip(report.classes, report.pr_curves) if curve is None]
    if missing:
        ax.plot([], [], " ", label="no ground truth: " + ", ".join(missing))
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Recall", ylabel="Precision")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_title(f"Precision-recall at IoU 0.5, {report.num_images} images\n"
                 f"mAP@0.5 = {_fmt(report.map50)}    mAP@0.5:0.95 = {_fmt(report.map)}")
    _save(fig, path)


def plot_detection_confusion(report: DetectionReport, path: str | Path) -> None:
    """The ``[C + 1, C + 1]`` confusion counts; colour is the share of each row, so
    rare and common classes read alike; the background/background cell is left empty."""
    counts = np.asarray(report.confusion)
    labels = [*report.classes, "background"]
    row_sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    side = max(6.0, 1.6 + 0.75 * len(labels))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the row")
    for row in range(len(labels)):
        for col in range(len(labels)):
            if row == col == len(labels) - 1:
                continue
            ax.text(col, row, str(counts[row, col]), ha="center", va="center", fontsize=11,
                    color="white" if shares[row, col] > 0.55 else ("black" if counts[row, col] else "0.6"))
    ax.axhline(len(labels) - 1.5, color="0.4", linewidth=1)
    ax.axvline(len(labels) - 1.5, color="0.4", linewidth=1)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("Predicted class (background: a ground-truth box was missed)")
    ax.set_ylabel("True class (background: a false detection)")
    ax.set_title(f"Detection confusion at score >= {report.score_threshold:g}, IoU >= {report.iou_threshold:g}\n"
                 f"mAP@0.5 = {_fmt(report.map50)}    mAP@0.5:0.95 = {_fmt(report.map)}")
    _save(fig, path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _save(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
