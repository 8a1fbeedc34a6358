"""Draw a run's top detections of one class beside the labelled boxes, on the first val images holding that class.

For looking at why a class scores low: labelled boxes solid green; the class's top detections dashed, cyan where
their IoU with a labelled box of the class is at least 0.5 and red where not, each with "score/IoU". The detector is
the product's (`Detector.load(run)`, with its refiner). Command (docs/benchmarks.md, session 35):

    python benchmarks/plot_class_detections.py runs/exp/s32_j08_s44 crazing --out docs/img/s35_crazing_val.png
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from metaldefect.atomic import atomic_path  # noqa: E402
from metaldefect.data.images import load_image  # noqa: E402
from metaldefect.inference.detector import Detector  # noqa: E402
from metaldefect.inference.evaluation import AP_SCORE_FLOOR, split_records  # noqa: E402

COLUMNS = 4
MATCH_IOU = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="training run directory with a saved split")
    parser.add_argument("label", help="the class to draw")
    parser.add_argument("--images", type=int, default=8, help="val images holding the class (default 8)")
    parser.add_argument("--top", type=int, default=5, help="detections of the class an image (default 5)")
    parser.add_argument("--out", required=True, help="PNG to write (a 64-colour palette image, small in git)")
    args = parser.parse_args()

    records = [r for r in split_records(Path(args.run), "val") if args.label in r.labels][:args.images]
    if not records:
        parser.error(f"no val image of {args.run} holds the class {args.label!r}")
    detections = Detector.load(args.run).predict_batch([r.path for r in records], conf=AP_SCORE_FLOOR)
    rows = -(-len(records) // COLUMNS)
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(4 * COLUMNS, 4.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record, found in zip(axes.flat, records, detections):
        ax.imshow(load_image(record.path), cmap="gray")
        labelled = torch.tensor([b for b, name in zip(record.boxes, record.labels) if name == args.label])
        for x0, y0, x1, y1 in labelled.tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=2.5))
        top = [d for d in found if d.label == args.label][:args.top]  # detections come sorted by score
        for rank, detection in enumerate(top):
            iou = float(box_iou(torch.tensor([detection.box]), labelled).max())
            x0, y0, x1, y1 = detection.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ls="--",
                                   ec="cyan" if iou >= MATCH_IOU else "red"))
            ax.text(x0 + 2, y0 + 8 + 10 * rank, f"{detection.score:.2f}/{iou:.2f}", color="yellow", fontsize=9)
        ax.set_title(Path(record.path).name, fontsize=11)
    figure.suptitle(f"{args.label}, val ({Path(args.run).name}): labelled boxes green; top-{args.top} detections "
                    f"dashed, cyan if IoU >= {MATCH_IOU} with a labelled box, red if not; score/IoU", fontsize=12)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=50, format="png")
    with atomic_path(args.out) as temporary:
        Image.open(buffer).convert("RGB").quantize(64).save(temporary, format="png", optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
