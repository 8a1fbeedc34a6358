"""Maintainer script: the packaged built-in model as a training run directory.

    python benchmarks/builtin_as_run.py runs/exp/ens_42_1 --split-dir runs/splits/neu_det_seed42

The package ships the trained part of the built-in model (weights.safetensors), its card and
config, but not its run directory, which later sessions (on a new machine) no longer have.
This writes one back: ``checkpoint_best.pt`` from the packaged weights and card, config.yaml,
classes.json and metrics.json as packaged, and ``split/`` copied from ``--split-dir`` (made
again with ``metaldefect data split``; the card names the split's seed). Then
``metaldefect evaluate``, ``metaldefect refine`` and ``benchmarks/package_builtin.py`` take it
like any run. Check the split by evaluating: the figures must be the card's.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from metaldefect.errors import MetalDefectError

SPLIT_FILES = ("train.txt", "val.txt", "test.txt", "split.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="run directory to write (must not exist)")
    parser.add_argument("--split-dir", required=True, help="the split the built-in model was trained on")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from metaldefect.atomic import staged_directory
    from metaldefect.engine.checkpoint import save_checkpoint
    from metaldefect.inference import builtin

    out, split_dir, folder = Path(args.out), Path(args.split_dir), builtin.builtin_dir()
    try:
        if out.exists():
            raise MetalDefectError(f"{out} exists")
        missing = [name for name in SPLIT_FILES[:3] if not (split_dir / name).is_file()]
        if missing:
            raise MetalDefectError(f"{split_dir}: no {', '.join(missing)} (make it with metaldefect data split)")
        card = builtin.read_json(folder / builtin.CARD_FILE)
        with staged_directory(out) as staging:  # the run appears whole or not at all
            (staging / "split").mkdir()
            for name in SPLIT_FILES:
                if (split_dir / name).is_file():
                    shutil.copyfile(split_dir / name, staging / "split" / name)
            for name in builtin.RUN_FILES:
                shutil.copyfile(folder / name, staging / name)
            save_checkpoint(staging / "checkpoint_best.pt", {
                "part": card["part"], "state": load_file(str(folder / builtin.WEIGHTS_FILE)),
                "model_spec": card["model_spec"], "classes": card["classes"], "weights": card["backbone_weights"]})
    except MetalDefectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{out}: the built-in model ({card['name']}) as a run; split from {split_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
