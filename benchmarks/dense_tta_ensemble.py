"""Does averaging help the dense head? Flip test-time augmentation and head ensembles, on one split.

For each run (dense head, frozen backbone; all runs share the first run's backbone and
input size), the images of ``--split`` go through the backbone once per view; the head's
per-location outputs for a flipped view are mapped back onto the plain grid (locations
mirrored, left/right or top/bottom distances swapped) and the logits and distances are
averaged before the head's own decoding (score, NMS). Reported, scored with pycocotools
(``evaluate_detections``): each run alone, each run with 2-view (none, hflip) and 4-view
(none, hflip, vflip, rot180) TTA, and the ensemble of all runs' heads on the plain view.

    python benchmarks/dense_tta_ensemble.py runs/exp/v224_convs4 --split val
    python benchmarks/dense_tta_ensemble.py runs/exp/v224_convs4 runs/exp/other --split test
"""
from __future__ import annotations

import argparse
import time

import torch

from metaldefect.config import load_config
from metaldefect.data.images import load_image
from metaldefect.data.transforms import VIEW_STEPS, to_input_tensor, view_image
from metaldefect.engine.checkpoint import load_run
from metaldefect.engine.coco_eval import evaluate_detections
from metaldefect.engine.run_data import build_data
from metaldefect.models.heads.ensemble import AVERAGED, average_outputs

FLIPS = ("none", "hflip", "vflip", "rot180")  # the views that keep the grid's axes


def level_sizes(outputs: dict) -> list[int]:
    """Locations per pyramid level (levels are concatenated in order; one stride per level)."""
    strides = outputs["strides"][0]
    return [int((strides == s).sum()) for s in torch.unique_consecutive(strides)]


def onto_plain_grid(outputs: dict, view: str) -> dict:
    """Per-location outputs of a flipped input ``[B, L, ...]``, mapped back to the unflipped locations."""
    steps = VIEW_STEPS[view]
    mapped = dict(outputs)
    for key in AVERAGED & outputs.keys():
        x, parts, start = outputs[key], [], 0
        for count in level_sizes(outputs):
            side = round(count ** 0.5)  # square inputs give square levels
            part = x[:, start:start + count].reshape(x.shape[0], side, side, *x.shape[2:])
            part = part.flip(2) if "h" in steps else part
            part = part.flip(1) if "v" in steps else part
            parts.append(part.reshape(x.shape[0], count, *x.shape[2:]))
            start += count
        x = torch.cat(parts, dim=1)
        if key == "box_ltrb":  # distances to (left, top, right, bottom)
            x = x[..., [2, 1, 0, 3]] if "h" in steps else x
            x = x[..., [0, 3, 2, 1]] if "v" in steps else x
        mapped[key] = x
    return mapped


def score_kind(checkpoint: dict) -> str:
    """The dense head's ``score`` option (``"quality"`` by default)."""
    return checkpoint["model_spec"]["head_kwargs"].get("score", "quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="dense-head run directories (the first one's backbone is used)")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = [load_run(run) for run in args.runs]
    models, classes = [model for model, _, _ in loaded], loaded[0][1]
    for run, (_, run_classes, checkpoint) in zip(args.runs, loaded):
        same_backbone = {k: v for k, v in checkpoint["model_spec"].items() if k not in ("head_name", "head_kwargs")} \
            == {k: v for k, v in loaded[0][2]["model_spec"].items() if k not in ("head_name", "head_kwargs")}
        same_score = score_kind(checkpoint) == score_kind(loaded[0][2])  # averaged outputs must mean the same
        if checkpoint["part"] != "head" or checkpoint["model_spec"]["head_name"] != "dense" or not same_backbone \
                or run_classes != classes or not same_score:
            parser.error(f"{run}: not a dense head with the same score, frozen backbone and classes as {args.runs[0]}")
    cfg = load_config(f"{args.runs[0]}/config.yaml")
    records = build_data(cfg).records[args.split]
    predictions: dict[str, list] = {}
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(records), 16):
            images = [load_image(record.path) for record in records[start:start + 16]]
            batch = torch.stack([to_input_tensor(image, cfg.model.input_size) for image in images])
            sizes = [(image.shape[1], image.shape[0]) for image in images]
            features = {view: models[0].backbone(view_image(batch, view)) for view in FLIPS}
            plain = []
            for run, model in zip(args.runs, models):
                outputs = [onto_plain_grid(model.head(features[view]), view) for view in FLIPS]
                plain.append(outputs[0])
                for name, count in ((run, 1), (f"{run} + hflip TTA", 2), (f"{run} + 4-flip TTA", 4)):
                    decoded = model.head.decode(average_outputs(outputs[:count]), sizes, classes)
                    predictions.setdefault(name, []).extend(decoded)
            if len(models) > 1:
                decoded = models[0].head.decode(average_outputs(plain), sizes, classes)
                predictions.setdefault(f"ensemble of {len(models)} heads", []).extend(decoded)
    print(f"{args.split}: {len(records)} images, {time.perf_counter() - started:.0f} s\n")
    print(f"| {args.split} | mAP@0.5 | mAP@0.5:0.95 |\n|---|---|---|")
    for name, found in predictions.items():
        report = evaluate_detections(records, found, classes)
        print(f"| {name} | {report.map50:.3f} | {report.map:.3f} |")


if __name__ == "__main__":
    main()
