"""``metaldefect refine RUN``: train a box refiner for a detector run, on the run's own split."""
from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "refine", help="train a box refiner that tightens a detector run's boxes (writes RUN/refiner.pt)",
        description="Train a small CNN that moves each detection's sides onto the defect's edges, from a crop of "
                    "the image around it, on the run's training images (labelled boxes jittered at random). "
                    "predict, evaluate, export, serve and the built-in packaging then use it with the run; "
                    "--no-refine turns it off.")
    parser.add_argument("run", metavar="RUN", help="training run directory of a detector (with split/)")
    parser.add_argument("--epochs", type=int, default=48, help="passes over the training images (default: 48)")
    parser.add_argument("--jitter", type=float, default=0.08,
                        help="side noise as a fraction of the box's width or height (default: 0.08)")
    parser.add_argument("--crop", type=int, default=48,
                        help="side in pixels of the crop the refiner sees, a multiple of 16 (default: 48)")
    parser.add_argument("--context", type=float, default=2.0,
                        help="crop size over the box's size, at least 1 (default: 2.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training arithmetic: bf16 autocast made steps 1.4-1.8x faster than float32 in one "
                             "timing on a CPU with AMX, and is emulated and slower on CPUs without AMX or "
                             "AVX512-BF16; auto picks bf16 where it is native (default: auto)")
    parser.add_argument("--force", action="store_true", help="replace the run's existing refiner.pt")
    parser.set_defaults(handler=run_refine)


def run_refine(args) -> int:
    from metaldefect.engine.checkpoint import load_checkpoint
    from metaldefect.engine.plots import plot_refiner_curves
    from metaldefect.engine.refine import REFINER_FILE, RefinerSettings, save_refiner, train_refiner
    from metaldefect.engine.run_files import write_history
    from metaldefect.errors import MetalDefectError
    from metaldefect.inference.evaluation import evaluate_run, split_records
    from metaldefect.models.heads import head_class

    run = Path(args.run)
    target = run / REFINER_FILE
    if not (run / "checkpoint_best.pt").is_file():
        raise MetalDefectError(f"{run}: not a training run (no checkpoint_best.pt in it)")
    if target.exists() and not args.force:
        raise MetalDefectError(f"{target} exists; pass --force to replace it")
    if args.epochs < 1 or not 0 < args.jitter < 1:
        raise MetalDefectError(f"--epochs must be at least 1 and --jitter in (0, 1); got {args.epochs}, {args.jitter}")
    if args.crop < 16 or args.crop % 16 or args.context < 1:
        raise MetalDefectError(f"--crop must be a multiple of 16 (at least 16) and --context at least 1; "
                               f"got {args.crop}, {args.context}")
    checkpoint = load_checkpoint(run / "checkpoint_best.pt")
    head_name = (checkpoint.get("model_spec") or {}).get("head_name")
    if head_name is None or head_class(head_name).task != "detect":
        raise MetalDefectError(f"{run}: not a detector run (head {head_name}); a box refiner needs boxes")
    classes = list(checkpoint["classes"])
    settings = RefinerSettings(epochs=args.epochs, jitter=args.jitter, crop=args.crop, context=args.context,
                               seed=args.seed, precision=args.precision)
    val = split_records(run, "val")
    refiner, summary = train_refiner(split_records(run, "train"), val, classes, settings,
                                     progress=sys.stderr.isatty())
    save_refiner(target, refiner, classes, summary)
    print(f"box refiner: {target} (best epoch {summary['best_epoch']}, {summary['train_seconds']:.0f} s "
          f"in {summary['precision']})")
    if val:
        # The detector's val mAP without and with the refiner, through the product path (after saving,
        # because the detector loads the refiner from the run).
        without = evaluate_run(run, val, progress=False, refine=False)
        with_refiner = evaluate_run(run, val, progress=False, refine=True)
        summary["val_map"] = {"without": {"map50": without.map50, "map": without.map},
                              "with": {"map50": with_refiner.map50, "map": with_refiner.map}}
        save_refiner(target, refiner, classes, summary)
        best = summary["best"]
        print(f"val IoU of jittered boxes {best['val_iou_before']:.3f} -> {best['val_iou_after']:.3f}")
        print(f"val mAP@0.5 {without.map50:.4f} -> {with_refiner.map50:.4f}, "
              f"mAP@0.5:0.95 {without.map:.4f} -> {with_refiner.map:.4f}")
    else:
        print(f"no val images (the run trained on them: train.final_fit); the last epoch is kept. "
              f"Score it with: metaldefect evaluate {run} --split test")
    write_history(run / "refiner_history.csv", summary["history"])
    plot_refiner_curves(summary["history"], run / "refiner_curves.png", title=f"{run.name}: box refiner")
    print(f"wrote {run}/refiner_history.csv, refiner_curves.png")
    return 0
