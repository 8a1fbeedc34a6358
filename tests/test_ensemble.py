"""The dense-head ensemble: averaged outputs, independent members, `metaldefect ensemble` and its errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from metaldefect.cli import main
from metaldefect.engine.checkpoint import load_run
from metaldefect.errors import ConfigError
from metaldefect.inference.detector import Detector
from metaldefect.models.heads import create_head
from synthetic_defects import make_dataset, write_config

IN_DIMS = {"pooled": 16, "map": 16, "layers": [16, 16], "stride": 14}
CLASSES = ["a", "b", "c", "d"]
TARGETS = [{"boxes": torch.tensor([[0.1, 0.2, 0.4, 0.6]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[0.5, 0.1, 0.9, 0.5]]), "labels": torch.tensor([3])}]


def features(batch: int = 2) -> dict:
    return {"layers": [torch.randn(batch, 16, 8, 8), torch.randn(batch, 16, 8, 8)]}


def ensemble(**options):
    torch.manual_seed(0)
    return create_head("dense_ensemble", IN_DIMS, num_classes=4, **{"channels": 16, "num_convs": 1,
                                                                      "scales": [1.0, 0.5], **options}).eval()


def test_outputs_are_the_mean_of_the_members_and_decode_as_one_dense_head():
    head, inputs = ensemble(members=3), features()
    with torch.no_grad():
        outputs = head(inputs)
        own = [member(inputs) for member in head.members]
    for key in ("cls_logits", "box_ltrb", "quality_logits"):
        assert torch.allclose(outputs[key], sum(o[key] for o in own) / 3, atol=1e-6)
        assert not torch.allclose(outputs[key], own[0][key])  # the members differ (own initialisations)
    merged = {**own[0], **{k: outputs[k] for k in ("cls_logits", "box_ltrb", "quality_logits")}}
    expected = head.members[0].decode(merged, [(100, 80)] * 2, CLASSES)
    assert head.decode(outputs, [(100, 80)] * 2, CLASSES) == expected


def test_two_copies_of_one_head_predict_what_that_head_predicts():
    head, inputs = ensemble(members=2), features()
    head.members[1].load_state_dict(head.members[0].state_dict())
    with torch.no_grad():
        alone = head.members[0].decode(head.members[0](inputs), [(64, 64)] * 2, CLASSES)
        assert head.decode(head(inputs), [(64, 64)] * 2, CLASSES) == alone


def test_the_loss_is_the_mean_of_the_members_losses_and_trains_each_member_on_its_own():
    head, inputs = ensemble(members=2), features()
    head.train()
    torch.manual_seed(1)
    loss = head.loss(head(inputs), TARGETS)
    own = [member.loss(member(inputs), TARGETS) for member in head.members]
    assert loss["loss"].item() == pytest.approx(sum(o["loss"].item() for o in own) / 2, rel=1e-5)
    assert set(loss) == set(own[0])
    # Member 1's gradient from the ensemble's loss is half its gradient from its own loss: no cross terms.
    head.zero_grad()
    head.loss(head(inputs), TARGETS)["loss"].backward()
    from_ensemble = head.members[1].cls_logits.weight.grad.clone()
    head.zero_grad()
    head.members[1].loss(head.members[1](inputs), TARGETS)["loss"].backward()
    assert torch.allclose(from_ensemble, head.members[1].cls_logits.weight.grad / 2, atol=1e-7)


def test_members_may_differ_in_width_but_not_in_what_a_location_means():
    head = ensemble(members=[{"channels": 8}, {"channels": 16, "num_convs": 2}])
    assert [m.cls_logits.in_channels for m in head.members] == [8, 16]
    with pytest.raises(ConfigError, match="differs from member 0 in 'scales'"):
        ensemble(members=[{}, {"scales": [1.0]}])
    with pytest.raises(ConfigError, match="at least 2 members"):
        ensemble(members=1)
    with pytest.raises(ConfigError, match="unknown option"):
        ensemble(members=2, colour="red")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two tiny dense runs on one frozen random backbone (same seed), their heads trained at different rates."""
    root = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(root / "NEU", images=16)
    for name, lr in (("a", 0.003), ("b", 0.01)):
        config = write_config(root / f"{name}.yaml", data, root / "cache", "dense",
                              model={"backbone": "vit_tiny_patch16_224", "input_size": 64,
                                     "head_kwargs": {"channels": 16, "num_convs": 1, "scales": [1.0, 0.5]}},
                              train={"epochs": 2, "lr": lr})
        assert main(["train", str(config), "--runs-dir", str(root / "runs")]) == 0
    return root / "runs"


def test_ensemble_of_two_runs_predicts_their_averaged_outputs_and_evaluates_as_a_run(runs, tmp_path, capsys):
    out = tmp_path / "ab"
    assert main(["ensemble", str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_best.pt", "classes.json", "config.yaml",
                                                     "metrics.json", "split"]
    members = json.loads((out / "metrics.json").read_text())["members"]
    assert [Path(m["run"]).name for m in members] == ["a", "b"]

    model, classes, checkpoint = load_run(out)
    assert checkpoint["model_spec"]["head_name"] == "dense_ensemble"
    (model_a, _, _), (model_b, _, _) = load_run(runs / "a"), load_run(runs / "b")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got, a, b = model(images), model_a(images), model_b(images)
    for key in ("cls_logits", "box_ltrb", "quality_logits"):
        assert torch.allclose(got[key], (a[key] + b[key]) / 2, atol=1e-6)

    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    assert "mAP@0.5" in capsys.readouterr().out
    assert (out / "eval_val" / "metrics.json").is_file()
    assert Detector.load(out).classes == classes


def test_the_ensembles_config_trains_its_members_side_by_side(runs, tmp_path):
    out = tmp_path / "ab"
    assert main(["ensemble", str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    assert main(["train", str(out / "config.yaml"), "train.epochs=1", "--runs-dir", str(tmp_path / "again")]) == 0
    state = load_run(tmp_path / "again" / "ab")[2]["state"]
    assert any(key.startswith("members.1.") for key in state)


def test_ensemble_refuses_runs_that_cannot_share_a_backbone_pass_in_one_line(runs, tmp_path, capsys):
    other_split = tmp_path / "c"
    shutil.copytree(runs / "b", other_split)
    (other_split / "split" / "val.txt").write_text("elsewhere.jpg\n")
    no_config = tmp_path / "d"
    shutil.copytree(runs / "a", no_config)
    (no_config / "config.yaml").unlink()
    cases = [
        ([runs / "a"], "at least 2 runs"),
        ([runs / "a", other_split], "its split differs"),
        ([runs / "a", tmp_path / "missing"], "checkpoint not found"),
        ([no_config, runs / "b"], "config file not found"),
        ([runs / "a", runs / "b"], "already exists"),
    ]
    (tmp_path / "out").mkdir()
    for members, message in cases:
        out = tmp_path / "out" if message == "already exists" else tmp_path / "new"
        capsys.readouterr()
        assert main(["ensemble", *map(str, members), "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1
        assert not (tmp_path / "new").exists()


def test_an_ensembles_model_card_names_its_members_and_their_epochs(runs, tmp_path):
    from metaldefect.engine.checkpoint import load_checkpoint
    from metaldefect.inference.builtin import card_from_run, card_markdown

    out = tmp_path / "ab"
    assert main(["ensemble", str(runs / "a"), str(runs / "b"), "--out", str(out)]) == 0
    card = card_from_run(out, load_checkpoint(out / "checkpoint_best.pt"), command="metaldefect ensemble a b")
    epochs = [load_checkpoint(runs / name / "checkpoint_best.pt")["epoch"] for name in ("a", "b")]
    costs = [json.loads((runs / name / "metrics.json").read_text()) for name in ("a", "b")]
    assert card["members"] == [
        {"run": name, "best_epoch": epoch, "train_seconds": cost["train_seconds"],
         "feature_seconds": cost["feature_seconds"], "precision": cost["precision"]}
        for name, epoch, cost in zip(("a", "b"), epochs, costs)]
    markdown = card_markdown({**card, "score_threshold": 0.5})
    assert (f"Ensemble of 2 dense heads, outputs averaged: run `a` (best epoch {epochs[0]}; trained in "
            f"{costs[0]['train_seconds']:.0f} s") in markdown
    assert f"run `b` (best epoch {epochs[1]}; trained in {costs[1]['train_seconds']:.0f} s" in markdown
    assert markdown.count(f", {costs[0]['precision']})") == 2
    assert "Best epoch:" not in markdown


def test_members_without_a_training_record_are_named_by_run_and_epoch_alone():
    from metaldefect.inference.builtin import card_markdown

    card = {"name": "old", "classes": ["a"], "backbone": "vit", "head": "dense_ensemble", "input_size": 224,
            "training_command": "metaldefect ensemble x y",
            "members": [{"run": "x", "best_epoch": 3}, {"run": "y", "best_epoch": 5, "train_seconds": 10.0}]}
    markdown = card_markdown(card)
    assert "run `x` (best epoch 3), run `y` (best epoch 5; trained in 10 s, float32)" in markdown
