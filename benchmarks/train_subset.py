"""Write a split whose train list is a stratified fraction of another split's, val and test unchanged.

For learning curves: train the same config on ``--fraction`` of the training images and score it on the
same val images, to see how much more labelled data would still give.

    python benchmarks/train_subset.py runs/splits/neu_det_seed42 --fraction 0.5 --out runs/splits/neu_det_seed42_train50
    metaldefect train configs/neu_det_dense_pair.yaml data.split_dir=runs/splits/neu_det_seed42_train50 ...

The subset is drawn with the data layer's own stratified split (``make_split``, each image in the stratum
of its rarest class), so every class keeps its share.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metaldefect.data.loading import load_dataset
from metaldefect.data.split import make_split, read_split, select_split, write_split
from metaldefect.errors import MetalDefectError


def subset_split(split_dir: Path, fraction: float, seed: int, out: Path) -> dict:
    """Write ``out`` (train.txt, val.txt, test.txt, split.json); returns the per-split counts."""
    info = json.loads((split_dir / "split.json").read_text(encoding="utf-8"))
    root = info["root"]
    records, _ = load_dataset(root)
    names = {name: read_split(split_dir / f"{name}.txt") for name in ("train", "val", "test")}
    train_records = select_split(records, root, names["train"], split_dir / "train.txt")
    kept = make_split(train_records, root, ratios=(fraction, 1 - fraction, 0.0), seed=seed)["train"]
    splits = {"train": kept, "val": names["val"], "test": names["test"]}
    write_split(out, splits, records, root, ratios=info["ratios"], seed=info["seed"])
    return json.loads((out / "split.json").read_text(encoding="utf-8"))["counts"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split_dir", type=Path, help="a split written by `metaldefect data split`")
    parser.add_argument("--fraction", type=float, required=True, help="share of the train images to keep, in (0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset draw (default 0)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction {args.fraction}: must be between 0 and 1")
    try:
        counts = subset_split(args.split_dir, args.fraction, args.seed, args.out)
    except (OSError, ValueError, KeyError, MetalDefectError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, count in counts.items():
        print(f"{name}: {count['images']} images, {count['boxes']} boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
