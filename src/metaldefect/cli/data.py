"""``metaldefect data ...``: dataset statistics, splits, the paper's merge, format conversion."""
from __future__ import annotations

import argparse
import sys

from metaldefect.data.coco import write_coco
from metaldefect.data.loading import FORMATS, load_dataset
from metaldefect.data.merge import merge_paper_dataset
from metaldefect.data.split import make_split, split_summary, write_split
from metaldefect.data.stats import dataset_stats
from metaldefect.data.voc import write_voc
from metaldefect.data.yolo import write_yolo


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="dataset tools: stats, split, merge, convert")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    formats = ["auto", *FORMATS]

    stats = commands.add_parser("stats", help="count images, boxes per class, box sizes; list every problem")
    stats.add_argument("root", help="dataset folder (or COCO json)")
    stats.add_argument("--format", default="auto", choices=formats, help="dataset format (default: detect)")
    stats.add_argument("--plot", metavar="PNG", help="also write a figure of the statistics")
    stats.add_argument("--strict", action="store_true", help="any problem is an error (exit 2)")
    stats.set_defaults(handler=run_stats)

    split = commands.add_parser("split", help="stratified, seeded train/val/test image lists")
    split.add_argument("root", help="dataset folder (or COCO json)")
    split.add_argument("--out", required=True, help="folder for train.txt, val.txt, test.txt, split.json")
    split.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.2, 0.1], metavar=("TRAIN", "VAL", "TEST"),
                       help="fractions of images per split (default: 0.7 0.2 0.1, the paper's)")
    split.add_argument("--seed", type=int, default=42, help="shuffle seed (default: 42, the paper's)")
    split.add_argument("--format", default="auto", choices=formats, help="dataset format (default: detect)")
    split.add_argument("--strict", action="store_true", help="any problem is an error (exit 2)")
    split.set_defaults(handler=run_split)

    merge = commands.add_parser("merge", help="the paper's 11-class dataset from NEU-DET and GC10-DET")
    merge.add_argument("--neu", required=True, help="NEU-DET root (IMAGES/, ANNOTATIONS/)")
    merge.add_argument("--gc10", required=True, help="GC10-DET root (lable/ and the images)")
    merge.add_argument("--out", required=True, help="output folder (Pascal VOC layout plus manifest.csv)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    merge.add_argument("--strict", action="store_true", help="any problem is an error (exit 2)")
    merge.set_defaults(handler=run_merge)

    convert = commands.add_parser("convert", help="write a dataset in another format (voc, yolo, coco)")
    convert.add_argument("root", help="dataset folder (or COCO json)")
    convert.add_argument("--to", required=True, choices=["voc", "yolo", "coco"], help="output format")
    convert.add_argument("--out", required=True, help="output folder (voc, yolo) or .json file (coco)")
    convert.add_argument("--format", default="auto", choices=formats, help="input format (default: detect)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    convert.add_argument("--strict", action="store_true", help="any problem is an error (exit 2)")
    convert.set_defaults(handler=run_convert)


def run_stats(args: argparse.Namespace) -> int:
    stats = dataset_stats(args.root, args.format, strict=args.strict)
    stats.problems.print(sys.stderr)
    print(stats.text())
    if args.plot:
        from metaldefect.data.stats_plot import plot_stats  # matplotlib loads only when a plot is asked for

        plot_stats(stats, args.plot)
        print(f"plot: {args.plot}")
    return 0


def run_split(args: argparse.Namespace) -> int:
    records, problems = load_dataset(args.root, args.format, strict=args.strict)
    problems.print(sys.stderr)
    splits = make_split(records, args.root, args.ratios, args.seed)
    write_split(args.out, splits, records, args.root, args.ratios, args.seed)
    for name, counts in split_summary(records, args.root, splits).items():
        print(f"{name}: {counts['images']} images, {counts['boxes']} boxes -> {args.out}/{name}.txt")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    result = merge_paper_dataset(args.neu, args.gc10, args.out, strict=args.strict, overwrite=args.overwrite)
    result.problems.print(sys.stderr)
    print(result.text())
    return 0


def run_convert(args: argparse.Namespace) -> int:
    records, problems = load_dataset(args.root, args.format, strict=args.strict)
    problems.print(sys.stderr)
    classes = sorted({label for record in records for label in record.labels})
    if args.to == "voc":
        write_voc(records, args.out, overwrite=args.overwrite)
    elif args.to == "yolo":
        write_yolo(records, args.out, classes, overwrite=args.overwrite)
    else:
        write_coco(records, args.out, classes)
    print(f"wrote {len(records)} images ({len(classes)} classes) as {args.to} to {args.out}")
    return 0
