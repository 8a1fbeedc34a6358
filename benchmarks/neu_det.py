"""NEU-DET detection benchmark: the dense ViT detector, and YOLO11n from scratch side by side.

Both systems train on the train part of one split of the NEU-DET subset and are scored by
the same function (:func:`metaldefect.engine.coco_eval.evaluate_detections`, pycocotools)
on its val and test parts. Reported per system: mAP@0.5, mAP@0.5:0.95, per-class AP,
training time as wall-clock minutes and as CPU minutes (user + system time of this
process and its children, all threads: on a 2-core machine one wall minute is at most 2 CPU
minutes), and inference ms/image (batch 1, image file to detections, wall clock).

Dense detector: ``metaldefect.engine.train.train`` on the config, with a fresh feature
cache under ``--out`` so that feature extraction is part of the measured training;
with ``--finetune CONFIG``, a second stage trains that config from the first run's weights
(``train.init_from``, e.g. the heads fine-tuned end to end with the ViT) inside the same clock;
with ``--refine``, ``metaldefect refine RUN`` (its default settings) trains the box refiner on the
last stage's run, inside the same clock too. The command's overrides apply to every stage; those given with
``--finetune-override`` apply to the second stage only, after them (e.g. fewer epochs for each stage).
Then ``Detector.load(run)`` predicts every image (product inference path, with the refiner when
there is one, score threshold 0).

YOLO11n (only when ``ultralytics`` is importable; it is never a dependency of the package):
built from ``yolo11n.yaml`` (random initialisation, no pretrained weights), trained on the same
train images exported with the data layer's YOLO writer, at the dense config's input size,
under a wall-clock budget (``--yolo-minutes``, default: the dense detector's training wall
time), then predicted with ``conf=0.001`` and scored by the same function. Ultralytics runs
offline (``YOLO_OFFLINE``), without plots, so it never fetches fonts or weights. It trains
with ``--threads`` torch threads like the dense detector (ultralytics would otherwise drop to
``os.cpu_count() - 1``, one thread here) and, as ultralytics does on a CPU, without loader workers.

    python benchmarks/neu_det.py --config configs/neu_det_dense.yaml --out runs/bench/neu_det_224
    python benchmarks/neu_det.py --config configs/neu_det_dense_pair.yaml --refine --out runs/bench/builtin
    python benchmarks/neu_det.py --config configs/neu_det_dense_pair.yaml --finetune configs/neu_det_dense_pair_ft.yaml --refine --out runs/bench/two_stage
    python benchmarks/neu_det.py --config configs/neu_det_dense_pair.yaml --finetune configs/neu_det_dense_pair_ft.yaml --refine --out runs/bench/short train.epochs=36 --finetune-override train.epochs=4
    python benchmarks/neu_det.py --config configs/neu_det_dense.yaml --out runs/bench/yolo_only --skip-dense --yolo-minutes 30

Results: ``OUT/results.json`` and a markdown table on stdout (copied into docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from metaldefect.atomic import write_text
from metaldefect.cli import main as cli_main
from metaldefect.config import load_config, resolve_path
from metaldefect.data import make_split, write_split, write_yolo
from metaldefect.data.loading import load_dataset
from metaldefect.data.records import Detection, Record
from metaldefect.engine.coco_eval import evaluate_detections
from metaldefect.engine.train import build_data, train
from metaldefect.inference.detector import Detector

SPLIT_RATIOS = (0.7, 0.2, 0.1)


class Clock:
    """Wall and CPU seconds since creation; CPU = user + system of this process and its children."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def minutes(self) -> dict:
        return {"wall_minutes": round((time.perf_counter() - self.wall0) / 60, 2),
                "cpu_minutes": round((self._cpu() - self.cpu0) / 60, 2)}


def ensure_split(cfg, seed: int) -> Path:
    """The config's split folder; made with the data layer (70/20/10, ``seed``) when it does not exist yet."""
    split_dir = resolve_path(cfg.data.split_dir)
    if not (split_dir / "train.txt").exists():
        root = resolve_path(cfg.data.root)
        records, problems = load_dataset(root, cfg.data.format)
        problems.print(limit=10)
        write_split(split_dir, make_split(records, root, SPLIT_RATIOS, seed), records, root, SPLIT_RATIOS, seed)
        print(f"split made: {split_dir}")
    return split_dir


def score(records: list[Record], predictions: list[list[Detection]], classes: list[str], seconds: list[float]) -> dict:
    report = evaluate_detections(records, predictions, classes)
    print(report.summary())
    return {"map50": report.map50, "map": report.map, "ap50": dict(zip(classes, report.ap50)),
            "ap": dict(zip(classes, report.ap)), "precision@0.25": report.precision, "recall@0.25": report.recall,
            "ms_per_image": round(1000 * sum(seconds) / len(seconds), 1), "images": len(records)}


def predict_timed(predict, records: list[Record]) -> tuple[list[list[Detection]], list[float]]:
    """``predict(path) -> detections`` for every record, and the wall seconds of each call."""
    predictions, seconds = [], []
    for record in records:
        start = time.perf_counter()
        predictions.append(predict(record.path))
        seconds.append(time.perf_counter() - start)
    return predictions, seconds


def run_dense(cfg, out: Path, data, refine: bool, finetune=None) -> dict:
    """Train the configured detector from an empty feature cache, then (``finetune``, a second config) a
    second stage from its weights, then (``refine``) the box refiner with ``metaldefect refine``'s defaults,
    all inside the timed training; score the last run through the product path."""
    cfg.train.cache_dir = str(out / "feature_cache")
    shutil.rmtree(cfg.train.cache_dir, ignore_errors=True)
    stages = [cfg] if finetune is None else [cfg, finetune]
    for stage in stages:
        shutil.rmtree(out / stage.name, ignore_errors=True)
    clock = Clock()
    run_dir = train(cfg, runs_dir=out)
    stage_minutes = {cfg.name: clock.minutes()}  # features and heads
    if finetune is not None:
        finetune.train.init_from = str(run_dir)
        run_dir = train(finetune, runs_dir=out)
        stage_minutes[finetune.name] = clock.minutes()
    if refine and cli_main(["refine", str(run_dir)]) != 0:
        raise SystemExit(f"metaldefect refine {run_dir} failed")
    training = clock.minutes()
    print(f"dense: trained in {training} (at the end of each stage, before the refiner: {stage_minutes})")
    detector = Detector.load(run_dir, backend="torch", tile="off", conf=0.0, batch_size=1)
    name = " then ".join(stage.name for stage in stages) + (" + refiner" if refine else "")
    result = {"system": f"dense ViT ({name})", "run": str(run_dir), "input_size": cfg.model.input_size,
              "epochs": [stage.train.epochs for stage in stages], "training": training,
              "training_at_stage_end": stage_minutes}
    for split in ("val", "test"):
        predictions, seconds = predict_timed(detector.predict, data.records[split])
        result[split] = score(data.records[split], predictions, data.classes, seconds)
    return result


def export_yolo(data, folder: Path) -> Path:
    """The split's train and val images as YOLO folders, and a data.yaml naming both."""
    shutil.rmtree(folder, ignore_errors=True)
    for split in ("train", "val"):
        write_yolo(data.records[split], folder / split, data.classes)
    config = {"path": str(folder), "train": "train/images", "val": "val/images", "names": dict(enumerate(data.classes))}
    write_text(folder / "data.yaml", yaml.safe_dump(config, sort_keys=False))
    return folder / "data.yaml"


def run_yolo(data, out: Path, image_size: int, minutes: float, seed: int, threads: int) -> dict:
    """YOLO11n from scratch under a wall-clock budget, scored by the same function as the dense detector."""
    os.environ["YOLO_OFFLINE"] = "1"  # no hub, no update checks, no font or weight downloads
    from ultralytics import YOLO
    from ultralytics.utils import torch_utils

    # Ultralytics resets torch to os.cpu_count() - 1 threads when it picks the CPU: one thread on
    # this 2-core machine, half of what the dense detector trains with. Give it the same threads.
    torch_utils.NUM_THREADS = threads
    used_threads = []

    data_yaml = export_yolo(data, out / "yolo_data")
    shutil.rmtree(out / "yolo", ignore_errors=True)
    clock = Clock()
    model = YOLO("yolo11n.yaml")  # architecture only: random initialisation
    model.add_callback("on_train_epoch_end", lambda trainer: used_threads.append(torch.get_num_threads()))
    model.train(data=str(data_yaml), imgsz=image_size, epochs=1000, time=minutes / 60, batch=16, device="cpu",
                workers=2, pretrained=False, amp=False, plots=False, val=False, seed=seed, deterministic=False,
                project=str(out), name="yolo", exist_ok=True, verbose=False)
    training = clock.minutes()
    print(f"yolo11n: trained in {training}")
    weights = out / "yolo" / "weights" / "last.pt"
    trained = YOLO(str(weights))
    index = {k: name for k, name in enumerate(data.classes)}

    def predict(path: Path) -> list[Detection]:
        (result,) = trained.predict(str(path), imgsz=image_size, conf=0.001, iou=0.7, max_det=100, device="cpu",
                                    verbose=False)
        boxes = result.boxes
        return [Detection(box=b, label=index[int(c)], score=float(s))
                for b, c, s in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist())]

    result = {"system": "YOLO11n from scratch", "run": str(weights), "input_size": image_size,
              "budget_minutes": minutes, "training": training, "epochs": len(used_threads),
              "torch_threads": sorted(set(used_threads))}
    for split in ("val", "test"):
        predictions, seconds = predict_timed(predict, data.records[split])
        result[split] = score(data.records[split], predictions, data.classes, seconds)
    return result


def table(results: list[dict], classes: list[str]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    head = ["system", "size", "train wall min", "train CPU min", "val mAP@0.5", "val mAP@0.5:0.95",
            "test mAP@0.5", "test mAP@0.5:0.95", "ms/image", *[f"AP50 {c}" for c in classes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["system"], str(r["input_size"]), f"{r['training']['wall_minutes']:.1f}",
               f"{r['training']['cpu_minutes']:.1f}", cell(r["val"]["map50"]), cell(r["val"]["map"]),
               cell(r["test"]["map50"]), cell(r["test"]["map"]), f"{r['val']['ms_per_image']:.0f}",
               *[cell(r["val"]["ap50"][c]) for c in classes]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/neu_det_dense.yaml")
    parser.add_argument("--out", default="runs/bench/neu_det", help="folder for runs, caches and results.json")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores)")
    parser.add_argument("--skip-dense", action="store_true", help="train YOLO11n only (needs --yolo-minutes)")
    parser.add_argument("--refine", action="store_true",
                        help="also train the box refiner (metaldefect refine RUN) as part of the dense training")
    parser.add_argument("--finetune", metavar="CONFIG", default=None,
                        help="a second stage: train this config from the first stage's run (train.init_from)")
    parser.add_argument("--finetune-override", metavar="KEY=VALUE", action="append", default=[],
                        help="a config override for the second stage only (repeatable), applied after the others")
    parser.add_argument("--no-yolo", action="store_true", help="skip YOLO11n even when ultralytics is installed")
    parser.add_argument("--yolo-minutes", type=float, default=None,
                        help="YOLO11n wall-clock training budget (default: the dense detector's training wall time)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=12")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.finetune_override and not args.finetune:
        parser.error("--finetune-override needs --finetune")
    cfg = load_config(args.config, args.overrides)
    cfg.train.progress = False
    finetune = None
    if args.finetune:
        finetune = load_config(args.finetune, [*args.overrides, *args.finetune_override])
        finetune.train.progress = False
        if finetune.name == cfg.name:
            parser.error(f"both stages are named {cfg.name!r}: with --finetune, do not override name=")
        if finetune.model != cfg.model or finetune.data != cfg.data:
            parser.error(f"{args.finetune}: its model and data sections must be those of {args.config}")
    out = resolve_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_split(cfg, cfg.data.split_seed)
    data = build_data(cfg)

    results = []
    if not args.skip_dense:
        results.append(run_dense(cfg, out, data, args.refine, finetune))
    have_yolo = importlib.util.find_spec("ultralytics") is not None  # benchmark-only, never a dependency
    if not have_yolo:
        print("ultralytics is not installed: YOLO11n skipped (pip install ultralytics to compare)")
    if have_yolo and not args.no_yolo:
        minutes = args.yolo_minutes or (results[0]["training"]["wall_minutes"] if results else None)
        if minutes is None:
            parser.error("--skip-dense needs --yolo-minutes")
        results.append(run_yolo(data, out, cfg.model.input_size, minutes, cfg.seed, args.threads))

    summary = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "config": args.config,
               "finetune": args.finetune, "finetune_overrides": args.finetune_override,
               "overrides": args.overrides, "split": str(resolve_path(cfg.data.split_dir)), "threads": args.threads,
               "classes": data.classes, "results": results}
    write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    if results:
        print(table(results, data.classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
