"""Tuning a ViT's last blocks on cached stem features (``train.tune_blocks``)."""
from __future__ import annotations

import pytest
import torch

from metaldefect.cli import main
from metaldefect.engine.checkpoint import load_checkpoint, load_run
from metaldefect.errors import ConfigError
from metaldefect.models import create_backbone
from metaldefect.models.factory import create_model
from metaldefect.models.tail_tuning import BackboneStem, TunedTail, stem_cut
from synthetic_defects import make_dataset, val_loss_from_images, write_config

SIZE = 56  # a 4 x 4 patch grid of ViT-S/14


@pytest.mark.parametrize("tune_blocks", [1, 2, 6])
def test_stem_then_tail_gives_the_backbones_own_features(tune_blocks):
    torch.manual_seed(0)
    model = create_model("vit_small_patch14_dinov2", "dense", 6, pretrained=False, input_size=SIZE,
                         head_kwargs={"channels": 16, "num_convs": 1})
    images = torch.rand(2, 1, SIZE, SIZE)
    cut = stem_cut(model.backbone, tune_blocks)
    with torch.no_grad():
        expected = model.backbone(images)
        stem = BackboneStem(model.backbone, cut)(images)
        features = TunedTail(model, cut).features(stem)
    assert len(stem["layers"]) == sum(i < cut for i in model.backbone.layers)
    assert len(features["layers"]) == len(expected["layers"]) == 4
    for name in ("pooled", "map"):
        torch.testing.assert_close(features[name], expected[name], rtol=1e-5, atol=1e-5)
    for got, want in zip(features["layers"], expected["layers"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_a_vit_with_a_frozen_block_left_can_be_tuned():
    vit = create_backbone("vit_small_patch14_dinov2", pretrained=False, input_size=SIZE)
    with pytest.raises(ConfigError, match="expected 1 to 11"):
        stem_cut(vit, 12)
    with pytest.raises(ConfigError, match="not a ViT"):
        stem_cut(create_backbone("paper_cnn", pretrained=False, input_size=32), 1)


def test_a_tuned_run_stores_its_blocks_and_reloads_them(tmp_path):
    data = make_dataset(tmp_path / "NEU", images=24)
    config = write_config(tmp_path / "tuned.yaml", data, tmp_path / "cache", "dense",
                          model={"backbone": "vit_small_patch14_dinov2", "input_size": SIZE,
                                 "head_kwargs": {"channels": 16, "num_convs": 1, "scales": [1.0]}},
                          train={"epochs": 2, "tune_blocks": 2, "lr": 0.003, "backbone_lr": 0.001,
                                 "augment": ["hflip"]})
    assert main(["train", str(config), "--runs-dir", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "tuned"
    checkpoint = load_checkpoint(run / "checkpoint_best.pt")
    assert checkpoint["part"] == "tuned"
    tuned_parts = ("backbone.model.blocks.10.", "backbone.model.blocks.11.", "backbone.model.norm.")
    backbone_keys = [key for key in checkpoint["state"] if key.startswith("backbone.")]
    assert all(key.startswith(tuned_parts) for key in backbone_keys)
    assert all(any(key.startswith(part) for key in backbone_keys) for part in tuned_parts)
    assert any(key.startswith("head.") for key in checkpoint["state"])
    initial = checkpoint["backbone_state"]  # the random backbone as the run started
    tuned = "backbone.model.blocks.11.mlp.fc1.weight"
    assert not torch.allclose(checkpoint["state"][tuned], initial["model.blocks.11.mlp.fc1.weight"])

    model, _, _ = load_run(run)
    assert torch.equal(model.state_dict()[tuned], checkpoint["state"][tuned])
    assert torch.equal(model.backbone.model.blocks[9].mlp.fc1.weight, initial["model.blocks.9.mlp.fc1.weight"])
    # The reloaded model, run end to end on the images, scores what training scored on the cached
    # stem (which holds fp16 tokens, hence the tolerance).
    assert val_loss_from_images(model, config, SIZE) == pytest.approx(checkpoint["metrics"]["loss"], rel=2e-3)

    # A tuned run resumes (it reloads through load_trained, checked above) and goes on tuning.
    before = load_checkpoint(run / "checkpoint_last.pt")["state"][tuned]
    assert main(["train", str(config), "train.epochs=3", "--runs-dir", str(tmp_path / "runs"), "--resume"]) == 0
    resumed = load_checkpoint(run / "checkpoint_last.pt")
    assert resumed["epoch"] == 3 and resumed["part"] == "tuned"
    assert not torch.equal(resumed["state"][tuned], before)
