"""`train.ema_decay`: the moving average's steps, what a run scores and saves, and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from metaldefect.cli import main
from metaldefect.config import load_config
from metaldefect.engine.checkpoint import load_checkpoint
from metaldefect.engine.engine import train_one_epoch
from metaldefect.engine.train import build_ema
from synthetic_defects import make_dataset, write_config


class Slope(nn.Module):
    """A "head" with one weight ``w`` and loss ``w``: plain SGD at lr 1 takes ``w`` to ``-k`` after step k."""
    task = "classify"

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, inputs: torch.Tensor) -> dict:
        return {"w": self.w}

    def loss(self, outputs: dict, targets) -> dict:
        return {"loss": outputs["w"]}

    def metrics(self, outputs: dict, targets) -> dict:
        return {}


def test_the_average_warms_up_over_the_global_step_across_epochs(tmp_path):
    cfg = load_config(write_config(tmp_path / "ema.yaml", tmp_path, tmp_path, train={"ema_decay": 0.5}))
    head = Slope()
    ema = build_ema(cfg, head)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    loader = [(torch.zeros(1, 1), None)] * 3
    expected, step = 0.0, 0
    for epoch in (1, 2):
        train_one_epoch(head, loader, optimizer, epoch, torch.device("cpu"), progress=False, ema=ema)
        for _ in loader:
            step += 1
            # Decay 0 at the first step (a copy), then 1 - step^-3/4 up to the 0.5 cap: 0.41 at step 2, 0.5 after.
            decay = 0.0 if step == 1 else min(0.5, 1 - step ** -0.75)
            expected = decay * expected + (1 - decay) * -step
    assert head.w.item() == -6.0
    assert ema.module.w.item() == pytest.approx(expected)
    assert expected == pytest.approx(-5.0, abs=0.05)  # about one step behind the weights, as decay 0.5 gives


def test_without_ema_decay_there_is_no_average(tmp_path):
    cfg = load_config(write_config(tmp_path / "plain.yaml", tmp_path, tmp_path))
    assert build_ema(cfg, Slope()) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synthetic") / "NEU", images=20)


def train(config: Path, runs: Path, *overrides: str, resume: bool = False) -> int:
    return main(["train", str(config), *overrides, "--runs-dir", str(runs), *(["--resume"] if resume else [])])


def test_a_run_scores_and_saves_the_average_and_resumes_it_exactly(tmp_path, data):
    # float32: an epoch's val pass runs in the training precision and the final evaluation in float32, and the
    # two are compared exactly below.
    config = write_config(tmp_path / "ema.yaml", data, tmp_path / "cache", "classifier",
                          train={"epochs": 3, "lr": 0.01, "ema_decay": 0.9, "precision": "fp32"})
    assert train(config, tmp_path / "split", "train.epochs=1") == 0
    run = tmp_path / "split" / "ema"
    first = load_checkpoint(run / "checkpoint_last.pt")
    best = load_checkpoint(run / "checkpoint_best.pt")
    # The last checkpoint keeps the live weights (to train on) and the average (to resume it);
    # the best one, of the only epoch, is the average.
    assert any(not torch.equal(first["state"][k], first["ema_state"][k]) for k in first["state"])
    assert all(torch.equal(best["state"][k], first["ema_state"][k]) for k in first["state"])
    # The val loss of epoch 1 is the average's: the run's final evaluation of the best weights gives it.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["loss"] == pytest.approx(best["metrics"]["loss"])

    assert train(config, tmp_path / "split", resume=True) == 0
    assert train(config, tmp_path / "straight") == 0
    resumed = load_checkpoint(run / "checkpoint_last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "ema" / "checkpoint_last.pt")
    for key in ("state", "ema_state"):
        assert all(torch.equal(resumed[key][k], straight[key][k]) for k in straight[key]), key


def test_resuming_with_ema_a_run_started_without_it_is_a_one_line_error(tmp_path, data, capsys):
    config = write_config(tmp_path / "plain.yaml", data, tmp_path / "cache", "classifier", train={"epochs": 1})
    assert train(config, tmp_path / "runs") == 0
    capsys.readouterr()
    assert train(config, tmp_path / "runs", "train.epochs=2", "train.ema_decay=0.9", resume=True) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "started without it" in error
