"""`torchrun --nproc_per_node 2` (gloo, CPU) trains through the same code path as one process, to the same numbers."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from metaldefect.cli import main
from synthetic_defects import make_dataset, write_config


def history(run) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this torch build")
def test_two_processes_match_one_process(tmp_path):
    data = make_dataset(tmp_path / "NEU", images=30)  # 18 train images: an even split over two processes
    # No augmentation or dropout, so the only difference between the runs is how the work is split:
    # one process with batches of 8, or two processes with batches of 4 each (the same 8 images per step).
    config = write_config(tmp_path / "ddp.yaml", data, tmp_path / "cache", "slots",
                          model={"head_kwargs": {"class_layers": [32], "box_layers": [32], "box_dropout": 0.0,
                                                 "matching": "hungarian", "inputs": "map"}},
                          train={"epochs": 3, "batch_size": 8, "augment": [], "lr": 0.01})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(config), "--runs-dir", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "metaldefect.cli", "train", str(config), "train.batch_size=4",
               "--runs-dir", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    single, ddp = tmp_path / "single" / "ddp", tmp_path / "ddp" / "ddp"
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["images"]["val"] == 12
    expected = json.loads((single / "metrics.json").read_text())
    # Class losses and metrics are per-slot means and match to float precision; the box loss is a mean
    # over each process's real boxes, so its gradients (and through the matching, the rest) differ a
    # little from one process's mean over all of a step's boxes: "within noise".
    for key in ("loss", "cce", "mse", "mae", "slot_acc_all", "slot_acc_real"):
        assert metrics["best"][key] == pytest.approx(expected["best"][key], rel=0.02, abs=0.01), key
    confusion = torch.tensor(metrics["confusion"])
    assert confusion.sum() == torch.tensor(expected["confusion"]).sum() == 12 * 3  # every val slot, once
    rows, expected_rows = history(ddp), history(single)
    assert len(rows) == len(expected_rows) == 3
    assert float(rows[0]["train_cce"]) == pytest.approx(float(expected_rows[0]["train_cce"]), rel=1e-4)
    for row, other in zip(rows, expected_rows):
        for key in ("train_loss", "val_loss", "val_mae"):
            assert float(row[key]) == pytest.approx(float(other[key]), rel=0.02), key
    # Only rank 0 wrote: one history, one set of checkpoints, no stray temporaries.
    assert sorted(p.name for p in ddp.iterdir() if p.name.startswith(".")) == []
