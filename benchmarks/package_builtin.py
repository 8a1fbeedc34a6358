"""Maintainer script: make a training run the built-in model shipped inside the package.

    python benchmarks/package_builtin.py runs/NAME --command "metaldefect train configs/neu_det_dense.yaml"

Scores the run's best weights on its own val and test splits (COCO mAP and precision /
recall at ``--conf``, as ``metaldefect evaluate``), then copies them (only the head for a
frozen-backbone run: the backbone comes from its offline weights provider at load time),
config.yaml, classes.json and metrics.json into src/metaldefect/builtin_model/, with
model_card.json and MODEL_CARD.md stating the training command, data, split and metrics.
Then checks that the packaged model loads and gives the run's own detections on the sample
images. Commit the folder afterwards.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaldefect.errors import MetalDefectError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="training run directory (runs/NAME) with checkpoint_best.pt")
    parser.add_argument("--command", help="the exact command that trained the run "
                                          "(default: metaldefect train RUN/config.yaml)")
    parser.add_argument("--conf", type=float, default=0.3, help="default score threshold of the built-in model")
    parser.add_argument("--dest", help="output folder (default: src/metaldefect/builtin_model)")
    args = parser.parse_args(argv)

    from metaldefect.inference import builtin
    from metaldefect.inference.detector import Detector
    from metaldefect.inference.evaluation import evaluate_run, split_records

    try:
        detection = {}
        for split in ("val", "test"):
            records = split_records(Path(args.run), split) if (Path(args.run) / "split" / f"{split}.txt").is_file() else []
            if records:
                report = evaluate_run(args.run, records, conf=args.conf)
                print(f"{split}: {report.summary()}")
                detection[split] = report.to_dict()
        folder = builtin.package_run(args.run, args.dest or builtin.BUILTIN_DIR, args.command, args.conf, detection)
        builtin.BUILTIN_DIR = folder
        packaged = Detector.load("builtin", tile="off")
        original = Detector.load(args.run, tile="off", conf=args.conf)  # same threshold as the packaged card
        samples = builtin.sample_images()
        for sample, got, expected in zip(samples, packaged.predict_batch(samples), original.predict_batch(samples)):
            if [d.to_dict() for d in got] != [d.to_dict() for d in expected]:  # labels, scores and boxes
                raise MetalDefectError(f"{sample.name}: the packaged model disagrees with the run")
    except MetalDefectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"packaged {args.run} -> {folder} ({size:.1f} MB); same detections as the run on {len(samples)} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
