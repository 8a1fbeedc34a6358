"""`metaldefect train`: the run directory, seeding, heads, end-to-end mode, early stopping, resume, errors."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from metaldefect.cli import main
from metaldefect.config import load_config
from metaldefect.engine.checkpoint import load_checkpoint, load_run
from metaldefect.engine.run_data import build_data
from metaldefect.engine.train import build_model
from metaldefect.errors import ConfigError
from synthetic_defects import CLASSES, make_dataset, write_config

RUN_FILES = {"config.yaml", "classes.json", "split", "history.csv", "curves.png", "confusion.png", "metrics.json",
             "checkpoint_best.pt", "checkpoint_last.pt"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synthetic") / "NEU", images=30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def train(config: Path, runs: Path, *extra: str) -> int:
    """``metaldefect train CONFIG [key=value ...] --runs-dir RUNS [--resume]``."""
    overrides = [item for item in extra if not item.startswith("--")]
    flags = [item for item in extra if item.startswith("--")]
    return main(["train", str(config), *overrides, "--runs-dir", str(runs), *flags])


def test_a_run_writes_every_file_and_is_reproducible(tmp_path, data, cache, capsys):
    config = write_config(tmp_path / "cls.yaml", data, cache, "classifier", train={"epochs": 4, "lr": 0.01})
    assert train(config, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "cls"
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_cce", "lr"} <= set(rows[0])
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["weights"]["source"] == "random" and metrics["weights"]["name"] == "paper_cnn"
    assert metrics["images"] == {"train": 18, "val": 12, "test": 0} and metrics["world_size"] == 1
    assert 1 <= metrics["best_epoch"] <= 4 and metrics["checkpoint"] == "checkpoint_best.pt"
    best_row = rows[metrics["best_epoch"] - 1]
    assert metrics["best"]["loss"] == pytest.approx(float(best_row["val_loss"]), rel=1e-4)
    assert sum(map(sum, metrics["confusion"])) == 12
    assert json.loads((run / "classes.json").read_text()) == sorted(CLASSES)
    saved = load_config(run / "config.yaml")
    assert saved.data.root == str(data) and saved.train.epochs == 4
    train_list = (run / "split" / "train.txt").read_text().split()
    assert len(train_list) == 18 and all(name.startswith("IMAGES/") for name in train_list)

    model, classes, checkpoint = load_run(run)
    assert classes == sorted(CLASSES) and checkpoint["epoch"] == metrics["best_epoch"]
    assert model.head.task == "classify"

    # The same config and seed give the same numbers.
    assert train(config, tmp_path / "again") == 0
    assert without_times(history(tmp_path / "again" / "cls")) == without_times(rows)
    assert "epoch 4" in capsys.readouterr().err


@pytest.mark.parametrize("head, kwargs", [
    ("single", {"inputs": "map", "box_activation": "sigmoid"}),
    ("slots", {"matching": "hungarian", "inputs": "map", "class_layers": [64], "box_layers": [32],
               "box_dropout": 0.0, "box_param": "cxcywh", "box_activation": "sigmoid", "box_loss": "l1",
               "giou_weight": 1.0}),
])
def test_detecting_heads_log_the_paper_metrics(tmp_path, data, cache, head, kwargs):
    config = write_config(tmp_path / f"{head}.yaml", data, cache, head, model={"head_kwargs": kwargs},
                          train={"epochs": 2})
    assert train(config, tmp_path / "runs") == 0
    run = tmp_path / "runs" / head
    row = history(run)[-1]
    expected = {"val_accuracy", "val_cce", "val_mse", "val_mae", "val_iou", "train_mse", "train_mae",
                "val_map50", "val_map"}
    if head == "slots":
        expected |= {"val_slot_acc_all", "val_slot_acc_real", "val_mse_all", "val_mae_all"}
    assert expected <= set(row)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= float(row["val_map"]) <= float(row["val_map50"]) <= 1.0
    if head == "slots":
        assert metrics["num_slots"] == 3  # the most objects in one synthetic image
        assert metrics["confusion_labels"][-1] == "no defect"
        assert 0.0 <= metrics["best"]["slot_acc_real"] <= metrics["best"]["slot_acc_all"] + 1.0
    assert (run / "confusion.png").stat().st_size > 0 and (run / "curves.png").stat().st_size > 0


def test_bf16_training_records_its_precision_and_saves_standard_float32_weights(tmp_path, data):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "dense.yaml", data, cache, "dense",
                          model={"backbone": "vit_tiny_patch16_224", "input_size": 64,
                                 "head_kwargs": {"channels": 16, "num_convs": 1, "scales": [1.0, 0.5]}},
                          train={"epochs": 2, "precision": "bf16", "monitor": "map50", "monitor_mode": "max"})
    assert train(config, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "dense"
    assert json.loads((run / "metrics.json").read_text())["precision"] == "bfloat16"
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        state = load_checkpoint(run / name)["state"]
        assert all(value.dtype == torch.float32 and value.is_contiguous() for value in state.values()
                   if value.is_floating_point())
    entries = [json.loads(meta.read_text()) for meta in cache.glob("*/meta.json")]
    assert entries and all(entry["precision"] == "bfloat16" for entry in entries)  # the features, extracted in bf16
    assert float(history(run)[-1]["train_loss"]) < float(history(run)[0]["train_loss"])


def test_end_to_end_training_updates_only_the_trainable_layers(tmp_path, data, cache):
    config = write_config(tmp_path / "e2e.yaml", data, cache, "classifier",
                          train={"frozen": False, "trainable_layers": 1, "epochs": 2, "augment": ["hflip"],
                                 "backbone_lr": 0.0005, "schedule": "none"})
    assert train(config, tmp_path / "runs") == 0
    checkpoint = load_checkpoint(tmp_path / "runs" / "e2e" / "checkpoint_last.pt")
    assert checkpoint["part"] == "model"
    # The optimizer holds the head's linear layer (weight, bias) and, in a group of its own
    # at train.backbone_lr, the backbone's last conv (weight, bias).
    head_group, backbone_group = checkpoint["optimizer"]["param_groups"]
    assert len(head_group["params"]) == len(backbone_group["params"]) == 2
    assert (head_group["lr"], backbone_group["lr"]) == (0.003, 0.0005)


def test_init_from_starts_end_to_end_training_from_a_frozen_runs_weights(tmp_path, data, cache, capsys):
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "heads.yaml", data, cache, "classifier", train={"epochs": 3, "lr": 0.01})
    assert train(config, runs) == 0
    source = json.loads((runs / "heads" / "metrics.json").read_text())["best"]
    # Any step at lr 1e-12 changes nothing measurable: the first epoch scores the loaded weights.
    still = ["train.frozen=false", "train.lr=1e-12", "train.epochs=1", "train.augment=[]"]
    assert train(config, runs, "name=started", f"train.init_from={runs / 'heads'}", *still) == 0
    assert f"starting from the weights of {runs / 'heads'}" in capsys.readouterr().err
    assert float(history(runs / "started")[0]["val_loss"]) == pytest.approx(source["loss"], rel=1e-4)
    assert train(config, runs, "name=fresh", *still) == 0
    assert float(history(runs / "fresh")[0]["val_loss"]) != pytest.approx(source["loss"], rel=1e-2)

    # A head trained alone may start a run at another input size; a whole model (its position embeddings for a
    # ViT) may not, nor a head whose weights depend on the map's size (one flattening the whole map).
    capsys.readouterr()
    assert train(config, runs, "name=resized", "model.input_size=48", f"train.init_from={runs / 'heads'}",
                 *still) == 0
    assert f"starting from the weights of {runs / 'heads'}" in capsys.readouterr().err
    flat = write_config(tmp_path / "flat.yaml", data, cache, "classifier", train={"epochs": 1},
                        model={"head_kwargs": {"inputs": "map"}})
    assert train(flat, runs) == 0
    cases = [(["name=e1", "model.input_size=48", f"train.init_from={runs / 'started'}"],
              "its model differs in input_size (32 there)"),
             (["name=e2", f"train.init_from={tmp_path / 'nowhere'}"], "checkpoint not found"),
             (["name=e3", "model.input_size=48", "model.head_kwargs.inputs=map", f"train.init_from={runs / 'flat'}"],
              "its weights do not fit this model (size mismatch for ")]
    for extra, message in cases:
        capsys.readouterr()
        assert train(config, runs, *extra, *still) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith("error: ") and message in error[-1], (extra, error)


def test_frozen_flips_are_cached_for_training_images_only(tmp_path, data):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "flips.yaml", data, cache, "classifier",
                          train={"epochs": 1, "augment": ["hflip", "vflip"]})
    assert train(config, tmp_path / "runs") == 0
    counts = {}
    for meta in cache.glob("*/meta.json"):
        entry = json.loads(meta.read_text())
        counts[entry["view"]] = entry["count"]
    images = {name: len((tmp_path / "runs" / "flips" / "split" / f"{name}.txt").read_text().split())
              for name in ("train", "val")}
    assert counts == {"none": images["train"] + images["val"], "hflip": images["train"], "vflip": images["train"]}


def test_early_stopping_ends_a_run_that_stopped_improving(tmp_path, data, cache):
    config = write_config(tmp_path / "stop.yaml", data, cache, "classifier",
                          train={"epochs": 10, "lr": 1e-12, "early_stopping": 2, "monitor": "accuracy",
                                 "monitor_mode": "max"})
    assert train(config, tmp_path / "runs") == 0
    metrics = json.loads((tmp_path / "runs" / "stop" / "metrics.json").read_text())
    assert metrics["stopped_early"] is True
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1  # nothing can change at lr 1e-12


def test_resume_after_a_kill_continues_from_the_last_completed_epoch(tmp_path, data, cache, capsys):
    epochs = 30
    config = write_config(tmp_path / "long.yaml", data, cache, "classifier",
                          train={"epochs": epochs, "batch_size": 2})
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "metaldefect.cli", "train", str(config), "--runs-dir", str(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = runs / "long"
    deadline = time.time() + 120
    killed_rows: list[dict] = []
    while time.time() < deadline and process.poll() is None:
        if (run / "history.csv").exists() and len(rows := history(run)) >= 2:
            process.send_signal(signal.SIGKILL)
            killed_rows = rows
            break
        time.sleep(0.01)
    process.wait()
    assert killed_rows, "the run ended before it could be killed mid-training"
    done = load_checkpoint(run / "checkpoint_last.pt")["epoch"]
    assert len(killed_rows) <= done < epochs

    capsys.readouterr()
    assert train(config, runs, "--resume") == 0
    assert f"resuming {run} after epoch {done}" in capsys.readouterr().err
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # every epoch once
    assert without_times(rows[:len(killed_rows)]) == without_times(killed_rows)

    # Resumed training continues the same sequence as a run that was never interrupted.
    assert train(config, tmp_path / "straight") == 0
    assert without_times(history(tmp_path / "straight" / "long")) == without_times(rows)

    # A finished run can be extended.
    assert train(config, runs, "--resume", f"train.epochs={epochs + 1}") == 0
    assert [int(r["epoch"]) for r in history(run)][-2:] == [epochs, epochs + 1]


def test_user_errors_are_one_line(tmp_path, data, cache, capsys):
    config = write_config(tmp_path / "dup.yaml", data, cache, "classifier", train={"epochs": 1})
    assert train(config, tmp_path / "runs") == 0
    capsys.readouterr()
    cases = [
        ([], "a run of this name exists; resume it with --resume"),
        (["name=fresh", "--resume"], "nothing to resume"),
        (["--resume", "model.head=single"], "cannot resume with a different 'model' section"),
        (["name=x", "train.lr=fast"], "train.lr: expected float"),
        (["name=y", "model.head_kwargs.hiden=[3]"], "unknown option 'hiden'"),
        (["name=z", "model.head=slots", "model.head_kwargs.num_slots=2"], "2 slots but"),
        (["name=w", "data.root=" + str(tmp_path / "nowhere")], "no such file or folder"),
        (["name=v", "data.split_dir=" + str(tmp_path / "nosplit")], "split"),
        (["name=u", "train.monitor=f1"], "train.monitor: 'f1' is not a metric"),
        (["name=t", "train.final_fit=true", "train.early_stopping=2"], "train.early_stopping: needs val scores"),
    ]
    for extra, message in cases:
        assert train(config, tmp_path / "runs", *extra) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith("error: ") and message in error[-1], (extra, error)


def test_paper_configs_start_on_neu_det(neu_root):
    """Each paper config builds its data and model on NEU-DET (training itself is the benchmark's job)."""
    for path in sorted((REPO_ROOT / "configs" / "paper").glob("*.yaml")):
        cfg = load_config(path, [f"data.root={neu_root}", "model.pretrained=false"])
        if cfg.data.classes:  # the GC10 pairs of the two-class experiment have NEU-DET stand-ins
            assert set(cfg.data.classes) <= {"crazing", "inclusion", "patches", "pitted_surface",
                                             "rolled-in_scale", "scratches"}, path
        data = build_data(cfg, say=lambda text: None)
        model, spec = build_model(cfg, data)
        assert len(data.classes) == (len(cfg.data.classes) if cfg.data.classes else 6)
        if cfg.model.head == "slots":
            assert spec["head_kwargs"]["num_slots"] == 9  # the most defects in one NEU-DET image
        assert sum(len(records) for records in data.records.values()) > 0


def test_gc10_configs_say_the_images_are_missing(gc10_labels):
    for name in ("gc10_cnn", "gc10_inceptionv3"):
        cfg = load_config(REPO_ROOT / "configs" / "paper" / f"{name}.yaml", [f"data.root={gc10_labels.parent}"])
        with pytest.raises(ConfigError, match="no usable images"):
            build_data(cfg, say=lambda text: None)


def test_the_vit_paper_config_keeps_the_paper_head():
    cfg = load_config(REPO_ROOT / "configs" / "paper" / "vit_multi_defect.yaml")
    kwargs = cfg.model.head_kwargs
    assert kwargs["class_layers"] == [1024, 512, 512, 256] and kwargs["box_layers"] == [128, 128, 64, 64]
    assert kwargs["box_dropout"] == [0.2, 0.2, 0.0, 0.0] and (kwargs["cls_weight"], kwargs["box_weight"]) == (1.0, 0.5)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == ("sgd", 0.01, 8, 100)
    assert cfg.data.split == [0.7, 0.2, 0.1] and cfg.data.split_seed == 42 and cfg.train.frozen
    assert yaml.safe_load((REPO_ROOT / "configs" / "paper" / "vit_multi_defect.yaml").read_text())["model"]["pretrained"]
