"""Evaluating a trained detector the way the field reports detectors: COCO mAP on a split.

Predictions come from the same :class:`Detector` users run (same resize, tiling and
decode), at a near-zero score threshold because AP integrates over every score; the
precision, recall and confusion matrix are then read at the model's own threshold.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from metaldefect.atomic import write_text
from metaldefect.data import load_dataset, read_split, select_split
from metaldefect.data.records import Record
from metaldefect.engine.coco_eval import DetectionReport, evaluate_detections
from metaldefect.engine.detection_plots import plot_detection_confusion, plot_pr_curves
from metaldefect.errors import MetalDefectError
from metaldefect.inference.detector import Detector

# Scores below this cannot change AP measurably but would swamp COCOeval with boxes.
AP_SCORE_FLOOR = 0.001


def split_records(run_dir: Path, split: str) -> list[Record]:
    """The records of one split of a training run, read from the run's saved split files."""
    split_file = run_dir / "split" / f"{split}.txt"
    config_file = run_dir / "config.yaml"
    if not split_file.is_file() or not config_file.is_file():
        raise MetalDefectError(f"{run_dir}: not a training run with a saved split (no {split_file.name} "
                               f"or config.yaml); pass --data DIR to evaluate on a dataset folder")
    data = (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}
    root = Path(data.get("root") or "")
    records, problems = load_dataset(root, data.get("format", "auto"))
    problems.print(limit=10)
    return select_split(records, root, read_split(split_file), split_file)


def evaluate_run(model: str | Path, records: list[Record], out_dir: Path | None = None,
                 conf: float | None = None, batch_size: int = 8, progress: bool = True,
                 refine: bool = True, precision: str = "fp32") -> DetectionReport:
    """Predict on ``records`` with ``model`` and score against their labels.

    Objects of classes the model does not know cannot be found by it: they are dropped from
    the ground truth, with one warning line saying how many.
    With ``out_dir``, writes ``metrics.json``, ``pr_curves.png`` and ``confusion.png`` there.
    ``refine``: apply the model's box refiner, when it has one; ``precision``: as :meth:`Detector.load`.
    """
    detector = Detector.load(model, batch_size=batch_size, refine=refine, precision=precision)
    if detector.task != "detect":
        raise MetalDefectError(f"{model}: a {detector.task} model has no boxes to evaluate with mAP")
    if not records:
        raise MetalDefectError("no images to evaluate")
    known = set(detector.classes)
    ground_truth = [r.with_objects([b for b, l in zip(r.boxes, r.labels) if l in known],
                                   [l for l in r.labels if l in known]) for r in records]
    unknown = sum(len(r.labels) for r in records) - sum(len(r.labels) for r in ground_truth)
    if unknown:
        print(f"warning: {unknown} labelled objects are of classes the model does not know; not scored",
              file=sys.stderr)
    predictions = []
    for start in tqdm(range(0, len(records), batch_size), desc="evaluate", unit="batch", disable=not progress):
        chunk = records[start:start + batch_size]
        predictions.extend(detector.predict_batch([r.path for r in chunk], conf=AP_SCORE_FLOOR))
    report = evaluate_detections(ground_truth, predictions, detector.classes,
                                 score_threshold=detector.score_threshold(conf))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "metrics.json", json.dumps(report.to_dict(), indent=2) + "\n")
        plot_pr_curves(report, out_dir / "pr_curves.png")
        plot_detection_confusion(report, out_dir / "confusion.png")
    return report
