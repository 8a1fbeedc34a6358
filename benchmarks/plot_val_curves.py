"""Plot the val mAP@0.5 and mAP@0.5:0.95 of several training runs against epoch, one line per run.

For comparing runs of a rule by eye: where the runs part, and whether one is behind all along or only at the
end. Each RUN is a run folder with a `history.csv` (`metaldefect train` writes it every epoch, so a run still
training can be drawn). Command (docs/benchmarks.md, session 21):

    python benchmarks/plot_val_curves.py runs/exp/s21_base_s42 runs/exp/s21_views16_s42 runs/exp/s21_base_s1 \
        runs/exp/s21_views16_s1 --labels "6 views, seed 42" "16 views, seed 42" "6 views, seed 1" \
        "16 views, seed 1" --out docs/img/views16_val_curves.png
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metaldefect.atomic import atomic_path  # noqa: E402

PANELS = (("val_map50", "val mAP@0.5"), ("val_map", "val mAP@0.5:0.95"))


def read_history(run: Path) -> list[dict[str, float]]:
    """``run/history.csv`` as rows of floats (an empty cell, e.g. no val after a final fit, is NaN)."""
    path = run / "history.csv"
    try:
        with path.open(newline="", encoding="utf-8") as file:
            return [{key: float(value) if value else float("nan") for key, value in row.items()}
                    for row in csv.DictReader(file)]
    except FileNotFoundError:
        raise SystemExit(f"{path}: no history.csv (not a training run?)") from None
    except ValueError as error:
        raise SystemExit(f"{path}: not a history.csv of numbers ({error})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the run folders' names)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--from-epoch", type=int, default=10,
                        help="first epoch drawn (default 10: the first epochs' low values would squash the rest)")
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    histories = [read_history(run) for run in args.runs]
    for run, history in zip(args.runs, histories):
        missing = [key for key, _ in PANELS if not history or key not in history[0]]
        if missing:
            sys.exit(f"{run / 'history.csv'}: no {', '.join(missing)} column (a detector run scored on val?)")

    figure, axes = plt.subplots(1, len(PANELS), figsize=(11, 4))
    for axis, (key, title) in zip(axes, PANELS):
        for label, history in zip(labels, histories):
            rows = [row for row in history if row["epoch"] >= args.from_epoch]
            axis.plot([row["epoch"] for row in rows], [row[key] for row in rows], label=label, linewidth=1.2)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(args.out) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
