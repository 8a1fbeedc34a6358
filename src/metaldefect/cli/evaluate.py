"""`metaldefect evaluate`: COCO mAP, per-class AP, P/R, PR curves and confusion of a trained detector."""
from __future__ import annotations

import sys
from pathlib import Path

from metaldefect.cli.predict import add_precision_option


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="mAP@0.5, mAP@0.5:0.95, per-class AP, PR curves of a run",
                                   description="Evaluate a detector (a run directory, .onnx file or builtin) "
                                               "on a split of its run or on a dataset folder, with pycocotools.")
    parser.add_argument("model", help="run directory, exported .onnx file, or 'builtin'")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", default="val", choices=["train", "val", "test"],
                       help="split of the run to evaluate on (default: val)")
    where.add_argument("--data", help="evaluate on every labelled image of this dataset folder instead")
    parser.add_argument("--conf", type=float, help="score threshold for precision, recall and the confusion "
                                                   "matrix (default: the model's)")
    parser.add_argument("--out", help="folder for metrics.json, pr_curves.png, confusion.png "
                                      "(default: RUN/eval_SPLIT, or ./eval for --data / non-run models)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-refine", action="store_true",
                        help="score the detector's own boxes: skip the model's box refiner (metaldefect refine)")
    add_precision_option(parser, default="fp32")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from metaldefect.data import load_dataset
    from metaldefect.errors import MetalDefectError
    from metaldefect.inference.evaluation import evaluate_run, split_records

    model = Path(args.model)
    if args.data:
        records, problems = load_dataset(args.data)
        problems.print(limit=10)
        default_out = Path("eval")
    else:
        records = split_records(model, args.split)
        if not records:
            why = " (a final fit trained on its val images: train.final_fit)" if args.split == "val" else ""
            raise MetalDefectError(f"{model}: its {args.split} split is empty{why}; choose another --split or --data")
        default_out = model / f"eval_{args.split}"
    out_dir = Path(args.out) if args.out else default_out
    report = evaluate_run(args.model, records, out_dir, args.conf, args.batch_size, progress=sys.stderr.isatty(),
                          refine=not args.no_refine, precision=args.precision)
    print(report.summary())
    print(f"mAP@0.5 {report.map50:.4f}  mAP@0.5:0.95 {report.map:.4f}" if report.map is not None
          else "no ground-truth boxes: mAP undefined")
    print(f"wrote {out_dir}/metrics.json, pr_curves.png, confusion.png")
    return 0
