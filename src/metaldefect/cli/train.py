"""``metaldefect train CONFIG [key=value ...] [--resume] [--runs-dir runs]``.

Under ``torchrun --nproc_per_node N -m metaldefect.cli train ...`` every process runs
this same command (data-parallel training; rank 0 writes the run).
"""
from __future__ import annotations

import os

from metaldefect.config import load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from a config; writes runs/NAME/",
        description="Train a model from a YAML config (see configs/). Writes RUNS_DIR/NAME/ with the resolved "
                    "config, history.csv, curves.png, confusion.png, metrics.json and checkpoints.")
    parser.add_argument("config", help="YAML config file, e.g. configs/paper/vit_multi_defect.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config values, e.g. train.lr=0.001 model.head_kwargs.matching=hungarian "
                             "(give them right after CONFIG, before the options)")
    parser.add_argument("--resume", action="store_true", help="continue the run NAME from its last completed epoch")
    parser.add_argument("--runs-dir", default="runs", help="folder that holds run directories (default: runs)")
    parser.set_defaults(handler=run_train)


def run_train(args) -> int:
    from metaldefect.engine.train import train  # torch and the models load only when training

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, args.runs_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line from rank 0 only
        print(f"run: {run_dir}")
    return 0
