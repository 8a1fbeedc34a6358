"""The dense head's learnt detail stem (``detail_width``): shapes, errors, training on cached features."""
from __future__ import annotations

import pytest
import torch

from metaldefect.cli import main
from metaldefect.engine.checkpoint import load_checkpoint, load_run
from metaldefect.errors import ConfigError
from metaldefect.models.factory import create_model
from metaldefect.models.heads.dense import DenseHead
from metaldefect.models.heads.detail_stem import DetailStem
from synthetic_defects import make_dataset, val_loss_from_images, write_config

IN_DIMS = {"pooled": 16, "map": 16, "layers": [16, 16], "stride": 14}
SIZE = 56  # a 4 x 4 patch grid of ViT-S/14


@pytest.mark.parametrize("channels", [1, 3])
def test_stem_maps_are_twice_as_fine_as_and_as_fine_as_the_vit_grid(channels):
    stem = DetailStem(width=4)
    maps = stem(torch.rand(2, channels, 224, 224), grid=16)
    assert maps[2.0].shape == (2, 16, 32, 32) and maps[1.0].shape == (2, 32, 16, 16)
    assert stem.dims == {2.0: 16, 1.0: 32}


@pytest.mark.parametrize("width, scales", [(-1, [1.0]), (4, [0.5, 0.25])])
def test_detail_width_needs_a_level_of_scale_two_or_one(width, scales):
    with pytest.raises(ConfigError, match="detail_width"):
        DenseHead(IN_DIMS, num_classes=2, scales=scales, detail_width=width)


def test_a_head_with_a_detail_stem_says_so_when_the_image_is_missing():
    head = DenseHead(IN_DIMS, num_classes=2, channels=16, num_convs=1, scales=[2.0, 1.0], detail_width=4)
    assert head.needs_image
    with pytest.raises(ValueError, match="features\\['image'\\]"):
        head({"layers": [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)]})


def test_the_image_changes_the_predictions_of_every_level_it_feeds():
    torch.manual_seed(0)
    head = DenseHead(IN_DIMS, num_classes=2, channels=16, num_convs=1, scales=[2.0, 1.0, 0.5], detail_width=4).eval()
    layers = [torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)]
    first = head({"layers": layers, "image": torch.rand(1, 3, 56, 56)})["box_ltrb"][0]
    second = head({"layers": layers, "image": torch.rand(1, 3, 56, 56)})["box_ltrb"][0]
    changed = (first - second).abs().sum(dim=1) > 0                      # [L]: 8x8, 4x4, 2x2 locations
    assert changed[:64].all() and changed[64:80].all()
    assert not changed[80:].any()  # the 2x2 level gets no detail map


def test_a_model_passes_its_images_to_a_head_that_needs_them():
    torch.manual_seed(0)
    model = create_model("vit_small_patch14_dinov2", "dense", 3, pretrained=False, input_size=SIZE,
                         head_kwargs={"channels": 16, "num_convs": 1, "scales": [2.0, 1.0], "detail_width": 4}).eval()
    images = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        features = model.backbone(images)
        direct = model.head({**features, "image": images})
        assert torch.equal(model(images)["cls_logits"], direct["cls_logits"])


def test_a_detail_run_trains_the_stem_on_cached_features_and_scores_the_same_from_images(tmp_path):
    data = make_dataset(tmp_path / "NEU", images=24)
    config = write_config(tmp_path / "detail.yaml", data, tmp_path / "cache", "dense",
                          model={"backbone": "vit_small_patch14_dinov2", "input_size": SIZE,
                                 "head_kwargs": {"channels": 16, "num_convs": 1, "scales": [2.0, 1.0],
                                                 "detail_width": 4}},
                          # float32: an epoch's val pass runs in the training precision, and its loss is
                          # compared below with a float32 pass over the images.
                          train={"epochs": 2, "augment": ["hflip", "vflip"], "precision": "fp32"})
    assert main(["train", str(config), "--runs-dir", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "detail"
    checkpoint = load_checkpoint(run / "checkpoint_best.pt")
    assert checkpoint["part"] == "head"
    stem_weight = "detail.stride4.0.0.weight"
    assert stem_weight in checkpoint["state"]

    torch.manual_seed(7)  # the config's seed: the stem as training started
    initial = create_model("vit_small_patch14_dinov2", "dense", 3, pretrained=False, input_size=SIZE,
                           head_kwargs={"channels": 16, "num_convs": 1, "scales": [2.0, 1.0], "detail_width": 4})
    assert not torch.allclose(checkpoint["state"][stem_weight], initial.head.state_dict()[stem_weight])

    # The reloaded model, run end to end on the images, scores what training scored on cached
    # features plus images read by the loader (the cached features are fp16, hence the tolerance).
    model, _, _ = load_run(run)
    assert val_loss_from_images(model, config, SIZE) == pytest.approx(checkpoint["metrics"]["loss"], rel=1e-4)
