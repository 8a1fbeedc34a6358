"""A one-page PNG of dataset statistics (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from metaldefect.atomic import atomic_path  # noqa: E402
from metaldefect.data.stats import DatasetStats  # noqa: E402


def plot_stats(stats: DatasetStats, out_path: str | Path) -> None:
    """Write a 2x2 figure: boxes per class, boxes per image, box width vs height, aspect ratios."""
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    title = f"{stats.root} ({stats.format}): {stats.label_files} label files, {stats.images} images, {stats.boxes} boxes"
    figure.suptitle(title, fontsize=12)

    names = list(stats.boxes_per_class)
    counts = list(stats.boxes_per_class.values())
    ax = axes[0, 0]
    bars = ax.barh(names[::-1], counts[::-1], color="tab:blue")
    ax.bar_label(bars, padding=3, fontsize=9)
    ax.set_title("boxes per class")
    ax.set_xlabel("boxes")
    ax.set_xlim(0, max(counts, default=1) * 1.15)

    ax = axes[0, 1]
    bars = ax.bar(list(stats.boxes_per_image), list(stats.boxes_per_image.values()), color="tab:orange")
    ax.bar_label(bars, padding=2, fontsize=8)
    ax.set_title("boxes per image")
    ax.set_xlabel("boxes in the image")
    ax.set_ylabel("images")
    ax.set_xticks(list(stats.boxes_per_image))

    sizes = stats.box_sizes
    ax = axes[1, 0]
    ax.scatter(sizes[:, 0], sizes[:, 1], s=4, alpha=0.3, color="tab:green")
    ax.set_title("box width vs height")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")

    ax = axes[1, 1]
    if len(sizes):
        # Log-spaced bins: a box 4x wider than tall is as far from square as one 4x taller.
        low, high = float(sizes[:, 3].min()), float(sizes[:, 3].max())
        ax.hist(sizes[:, 3], bins=np.geomspace(low, high * 1.0001, 50), color="tab:purple")
        ax.set_xscale("log")
    ax.set_title("aspect ratio (width / height, log scale)")
    ax.set_xlabel("width / height")
    ax.set_ylabel("boxes")

    figure.tight_layout()
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
