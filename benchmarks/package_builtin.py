"""Maintainer script: make a training run the built-in model shipped inside the package.

    python benchmarks/package_builtin.py runs/NAME --command "metaldefect train configs/neu_det_dense.yaml"

Scores the run's best weights on its own val and test splits (COCO mAP and precision /
recall at ``--conf``, as ``metaldefect evaluate``), then copies them (only the head for a
frozen-backbone run: the backbone comes from its offline weights provider at load time),
config.yaml, classes.json and metrics.json into src/metaldefect/builtin_model/, with
model_card.json and MODEL_CARD.md stating the training command, data, split and metrics.
Then checks that the packaged model loads and gives the run's own detections on the sample
images. With ``--half`` the weights are stored in float16 (for a model fine-tuned end to end,
which ships its whole ViT): the packaged model is then scored on the same splits, the card
gives its scores, and the sample check allows float16's rounding. Commit the folder afterwards.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaldefect.errors import MetalDefectError

# What float16 weights may change in a detection on the samples (float32 weights must change nothing).
HALF_SCORE_TOLERANCE, HALF_BOX_TOLERANCE = 0.02, 1.0  # score, pixels


def same_detections(got, expected, half: bool) -> bool:
    """Whether two images' detections agree: exactly, or within float16's rounding for ``half``."""
    if not half:
        return [d.to_dict() for d in got] == [d.to_dict() for d in expected]  # labels, scores and boxes
    return len(got) == len(expected) and all(
        a.label == b.label and abs(a.score - b.score) <= HALF_SCORE_TOLERANCE
        and max(abs(u - v) for u, v in zip(a.box, b.box)) <= HALF_BOX_TOLERANCE for a, b in zip(got, expected))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="training run directory (runs/NAME) with checkpoint_best.pt")
    parser.add_argument("--command", help="the exact command that trained the run "
                                          "(default: metaldefect train RUN/config.yaml)")
    parser.add_argument("--conf", type=float, default=0.3, help="default score threshold of the built-in model")
    parser.add_argument("--dest", help="output folder (default: src/metaldefect/builtin_model)")
    parser.add_argument("--half", action="store_true", help="store the weights in float16 (half the size)")
    args = parser.parse_args(argv)

    from metaldefect.inference import builtin
    from metaldefect.inference.detector import Detector
    from metaldefect.inference.evaluation import evaluate_run, split_records

    dtype = "float16" if args.half else "float32"
    try:
        splits = {split: split_records(Path(args.run), split) for split in ("val", "test")
                  if (Path(args.run) / "split" / f"{split}.txt").is_file()}
        splits = {split: records for split, records in splits.items() if records}

        def scores(model: str, who: str) -> dict:
            reports = {}
            for split, records in splits.items():
                report = evaluate_run(model, records, conf=args.conf)
                print(f"{who}, {split}: {report.summary()}")
                reports[split] = report.to_dict()
            return reports

        detection = scores(args.run, "the run")
        dest = args.dest or builtin.BUILTIN_DIR
        folder = builtin.package_run(args.run, dest, args.command, args.conf, detection, dtype)
        builtin.BUILTIN_DIR = folder
        if args.half:  # float16 weights are not the run's own: the card gives the packaged model's scores
            packaged_scores = scores("builtin", "packaged in float16")
            for split, report in packaged_scores.items():
                print(f"{split}: float16 - float32 = mAP@0.5 {report['map50'] - detection[split]['map50']:+.4f}, "
                      f"mAP@0.5:0.95 {report['map'] - detection[split]['map']:+.4f}")
            folder = builtin.package_run(args.run, dest, args.command, args.conf, packaged_scores, dtype)
        packaged = Detector.load("builtin", tile="off")
        original = Detector.load(args.run, tile="off", conf=args.conf)  # same threshold as the packaged card
        samples = builtin.sample_images()
        for sample, got, expected in zip(samples, packaged.predict_batch(samples), original.predict_batch(samples)):
            if not same_detections(got, expected, args.half):
                raise MetalDefectError(f"{sample.name}: the packaged model disagrees with the run")
    except MetalDefectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"packaged {args.run} -> {folder} ({size:.1f} MB, weights in {dtype}); the run's detections on "
          f"{len(samples)} samples{' within float16 rounding' if args.half else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
