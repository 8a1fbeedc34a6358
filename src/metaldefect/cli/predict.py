"""``metaldefect predict PATH...``: detections on image files and folders, written to an output folder.

Exit status: 0 every image was predicted; 3 some inputs were skipped (unreadable file,
missing path, empty folder; one ``warning:`` line each) and the rest were predicted;
2 nothing could be done (no image at all, bad model; one ``error:`` line).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from metaldefect.data.images import IMAGE_SUFFIXES, load_image
from metaldefect.data.problems import ProblemLog
from metaldefect.errors import DataError, MetalDefectError

EXIT_SKIPPED = 3
SUFFIXES_TEXT = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="find defects on images and folders: JSON, CSV, annotated PNGs",
        description=f"Predict defects on image files and folders (searched recursively for {SUFFIXES_TEXT}). "
                    "Exit status 3 when some inputs were skipped.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    add_model_options(parser)
    parser.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--no-images", action="store_true", help="skip the annotated PNGs")
    parser.add_argument("--html", action="store_true", help="also write report.html with every image embedded")
    parser.set_defaults(handler=run_predict)


def add_model_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        parser.add_argument("--model", default="builtin",
                            help="training run directory, exported .onnx file, or 'builtin' (default)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                        help="auto: ONNX Runtime for .onnx models, PyTorch otherwise")
    parser.add_argument("--conf", type=float, default=None,
                        help="score threshold in [0, 1] (default: the model card's, else 0.3)")
    parser.add_argument("--tile", default="auto",
                        help="'auto' (tile images longer than 2x the model input), 'off', or a tile size in pixels")
    parser.add_argument("--overlap", type=float, default=None,
                        help="tile overlap as a fraction of the tile (default: 0.25)")
    parser.add_argument("--batch-size", type=int, default=8, help="network inputs per batch (default: 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the libraries'; 1 was fastest on a busy 2-core CPU)")
    parser.add_argument("--no-refine", action="store_true",
                        help="keep the detector's boxes: skip the model's box refiner (metaldefect refine)")
    add_precision_option(parser, default="auto")


def add_precision_option(parser: argparse.ArgumentParser, default: str) -> None:
    # auto for predict, serve and demo: on the built-in model bf16 scored val mAP within 0.0003 of float32 and ran
    # 1.25 times as fast at batch 1 (docs/benchmarks.md, session 18). evaluate keeps fp32, so that it reproduces
    # the figures the docs report, all measured in float32. The choices are engine.precision.PRECISIONS written
    # out: importing that module loads torch, which `--help` should not wait for.
    parser.add_argument("--precision", default=default, choices=["auto", "fp32", "bf16"],
                        help=f"PyTorch backend arithmetic: fp32, bf16 autocast, or auto (bf16 where the CPU computes "
                             f"it natively); default {default}")


def collect_images(paths: list[str], problems: ProblemLog) -> list[tuple[Path, str]]:
    """``(file, output name)`` for each image under ``paths``; folders recursively, hidden files ignored.

    Output names are the file stem, or the path below a given folder joined with ``__``;
    clashes get ``-2``, ``-3``... A missing path or a folder without images is a problem.
    """
    found: list[tuple[Path, str]] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not files:
                problems.add(path, f"no images ({SUFFIXES_TEXT}) in this folder")
            found += [(f, "__".join(f.relative_to(path).with_suffix("").parts)) for f in files]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            problems.add(path, "no such file or folder")
    used: dict[str, int] = {}
    named = []
    for file, name in found:
        used[name] = used.get(name, 0) + 1
        named.append((file, name if used[name] == 1 else f"{name}-{used[name]}"))
    return named


def predict_files(detector, files: list[tuple[Path, str]], writer, problems: ProblemLog,
                  conf: float | None = None, batch_size: int = 8) -> None:
    """Load, predict and write each image in batches; unreadable ones become problems (one line each)."""
    bar = tqdm(total=len(files), unit="image", desc="predict", file=sys.stderr, disable=None, dynamic_ncols=True)
    for start in range(0, len(files), batch_size):
        loaded = []
        for file, name in files[start:start + batch_size]:
            try:
                loaded.append((file, name, load_image(file)))
            except DataError as error:
                problems.add(file, str(error).removeprefix(f"{file}: "))
                tqdm.write(f"warning: skipped {error}", file=sys.stderr)
        if loaded:
            detections = detector.predict_batch([image for _, _, image in loaded], conf)
            for (file, name, image), found in zip(loaded, detections):
                writer.add(name, file, image, found)
        bar.update(len(files[start:start + batch_size]))
    bar.close()


def load_detector(args: argparse.Namespace, source: str):
    from metaldefect.inference.detector import Detector

    return Detector.load(source, backend=args.backend, tile=args.tile, conf=args.conf, overlap=args.overlap,
                         batch_size=args.batch_size, threads=args.threads, refine=not args.no_refine,
                         precision=args.precision)


def run_predict(args: argparse.Namespace) -> int:
    from metaldefect.inference.outputs import OutputWriter

    problems = ProblemLog()
    files = collect_images(args.paths, problems)
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if not files:
        raise MetalDefectError(f"no images to predict on in {', '.join(args.paths)} (looked for {SUFFIXES_TEXT})")
    detector = load_detector(args, args.model)
    threshold = detector.score_threshold(args.conf)
    writer = OutputWriter(Path(args.out), detector.classes, detector.card.get("name") or str(args.model), threshold,
                          images=not args.no_images)
    predict_files(detector, files, writer, problems, args.conf, args.batch_size)
    writer.finish(detector.card, [str(p) for p in problems], report=args.html)
    return summarise(writer, problems, args.out)


def summarise(writer, problems: ProblemLog, out: str | Path) -> int:
    """Print what was written; the exit status (0, or 3 when something was skipped)."""
    total = sum(len(r.detections) for r in writer.results)
    print(f"{len(writer.results)} images, {total} detections -> {out}/ "
          f"(summary.csv, detections.csv, json/{', annotated/' if writer.images else ''})")
    if len(problems):
        print(f"{len(problems)} inputs skipped (listed above); exit status {EXIT_SKIPPED}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0
