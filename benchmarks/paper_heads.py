"""The paper's heads on frozen, cached DINOv2 ViT-S/14 features of NEU-DET (docs/benchmarks.md).

Trains each config with ``metaldefect train`` (one process after another), measures wall
and CPU time per run, then scores the detecting heads' best checkpoints on the validation
split with COCO mAP (pycocotools, through metaldefect.engine.coco_eval), which needs no
slot assignment and so compares the ordered and the Hungarian slot heads on equal terms.

    python benchmarks/paper_heads.py                   # all four configs, runs in runs/paper_heads
    python benchmarks/paper_heads.py --only neu_det_vit_classifier

The split is made first if missing (70/20/10, seed 42, as the configs expect):
    metaldefect data split ../shared/data/NEU-DET --out runs/splits/neu_det_seed42 --seed 42
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("neu_det_vit_classifier", "neu_det_vit_single", "neu_det_vit_slots_ordered", "neu_det_vit_slots_hungarian")
SPLIT_DIR = Path("runs/splits/neu_det_seed42")


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ensure_split(data_root: str) -> None:
    if (SPLIT_DIR / "train.txt").is_file():
        return
    subprocess.run(["metaldefect", "data", "split", data_root, "--out", str(SPLIT_DIR), "--seed", "42"], check=True)


def train(config: Path, runs_dir: Path, log: Path) -> dict:
    """Run one config in a child process; return its wall and CPU seconds."""
    wall, cpu = time.time(), cpu_seconds_of_children()
    with open(log, "w") as handle:
        command = ["metaldefect", "train", str(config), "train.progress=false", "--runs-dir", str(runs_dir)]
        subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=True)
    return {"wall_seconds": round(time.time() - wall, 1), "cpu_seconds": round(cpu_seconds_of_children() - cpu, 1)}


@torch.no_grad()
def detection_map(run_dir: Path) -> dict:
    """mAP@0.5 and mAP@0.5:0.95 of the best checkpoint on the run's validation split (cached features)."""
    from metaldefect.config import load_config
    from metaldefect.data.dataset import collate
    from metaldefect.engine.checkpoint import load_run
    from metaldefect.engine.coco_eval import evaluate_detections
    from metaldefect.engine.features import extract_features
    from metaldefect.engine.run_data import SPLITS, build_data
    from metaldefect.models.weights import cache_dir

    cfg = load_config(run_dir / "config.yaml")
    model, classes, _ = load_run(run_dir, "best")
    data = build_data(cfg, say=lambda text: None)
    paths = sorted({str(r.path) for name in SPLITS for r in data.records[name]})
    features = extract_features(model.backbone, paths, Path(cfg.train.cache_dir or cache_dir() / "features"),
                                views=("none",), progress=False)
    rows = features.index
    records = data.records["val"]
    predictions = []
    for start in range(0, len(records), 64):
        chunk = records[start:start + 64]
        batch, _ = collate([(features.get(rows[str(r.path)]), {}) for r in chunk])
        outputs = model.head(batch)
        predictions += model.head.decode(outputs, [(r.width, r.height) for r in chunk], classes, score_threshold=0.0)
    report = evaluate_detections(records, predictions, classes)
    return {"map50": report.map50, "map": report.map}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs/paper_heads", type=Path)
    parser.add_argument("--only", nargs="*", default=list(CONFIGS), help="config names (configs/NAME.yaml)")
    parser.add_argument("--data", default="../shared/data/NEU-DET")
    args = parser.parse_args()
    ensure_split(args.data)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only:
        run_dir = args.runs_dir / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a benchmark measures a fresh run
        print(f"training {name} ...", flush=True)
        timing = train(REPO / "configs" / f"{name}.yaml", args.runs_dir, args.runs_dir / f"{name}.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result = {**timing, "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs_run"],
                  "feature_seconds": metrics["feature_seconds"], "features_computed": metrics["features_computed"],
                  "val": metrics["best"], "test": metrics["test"]}
        if metrics["task"] == "detect":
            result["val_coco"] = detection_map(run_dir)
        results[name] = result
        print(json.dumps({name: result}, indent=1), flush=True)
    (args.runs_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    keys = ("accuracy", "slot_acc_all", "slot_acc_real", "mse", "mae", "iou")
    print("\n| config | " + " | ".join(f"val {k}" for k in keys) + " | val mAP@0.5 | val mAP@.5:.95 | CPU s | wall s |")
    print("|" + " --- |" * (len(keys) + 5))
    for name, result in results.items():
        val = result["val"]
        cells = [f"{val[k]:.4f}" if val.get(k) is not None else "-" for k in keys]
        coco = result.get("val_coco", {})
        cells += [f"{coco[k]:.3f}" if coco.get(k) is not None else "-" for k in ("map50", "map")]
        print(f"| {name} | " + " | ".join(cells) + f" | {result['cpu_seconds']:.0f} | {result['wall_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
