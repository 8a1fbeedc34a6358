"""``metaldefect demo``: the built-in model on the packaged sample images, with an HTML report."""
from __future__ import annotations

import argparse
from pathlib import Path

from metaldefect.cli.predict import add_model_options, load_detector, predict_files, summarise
from metaldefect.data.problems import ProblemLog
from metaldefect.errors import MetalDefectError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the built-in model on the packaged sample images: annotated PNGs, JSON, HTML report")
    parser.add_argument("--out", default="metaldefect-demo", help="output folder (default: ./metaldefect-demo)")
    add_model_options(parser, model=False)
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from metaldefect.inference.builtin import SAMPLES_DIR, sample_images
    from metaldefect.inference.outputs import OutputWriter

    files = [(path, path.stem) for path in sample_images()]
    if not files:
        raise MetalDefectError(f"{SAMPLES_DIR}: no sample images are packaged in this build")
    detector = load_detector(args, "builtin")
    writer = OutputWriter(Path(args.out), detector.classes, detector.card.get("name") or "builtin",
                          detector.score_threshold(args.conf))
    problems = ProblemLog()
    predict_files(detector, files, writer, problems, args.conf, args.batch_size)
    writer.finish(detector.card, [str(p) for p in problems], report=True)
    status = summarise(writer, problems, args.out)
    print(f"report: {Path(args.out) / 'report.html'}")
    return status
