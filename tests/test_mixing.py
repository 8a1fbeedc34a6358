"""Mix views: images joined at a cut, boxes clipped, the pairing fixed; cached, read and trained on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_features import make_images, tiny_backbone
from test_train_run import history, train

from metaldefect.data.dataset import FeatureDataset, ImageDataset
from metaldefect.data.images import load_image
from metaldefect.data.mixing import CUTS, MIN_PART, Mixes, mix_images, mix_plan, mix_plans, mix_targets
from metaldefect.data.records import Record
from metaldefect.data.transforms import to_input_tensor
from metaldefect.engine.features import extract_features
from synthetic_defects import make_dataset, write_config


def target(boxes, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "size": (200, 200)}


def test_mixed_images_take_each_side_of_the_cut_from_one_image():
    first, second = torch.zeros(3, 64, 64), torch.ones(3, 64, 64)
    across_x = mix_images(first, second, 0.375, axis=0)
    assert across_x.shape == (3, 64, 64)
    assert across_x[..., :24].eq(0).all() and across_x[..., 24:].eq(1).all()
    across_y = mix_images(first, second, 0.625, axis=1)
    assert across_y[:, :40].eq(0).all() and across_y[:, 40:].eq(1).all()
    with pytest.raises(ValueError, match="one shape"):
        mix_images(first, torch.ones(3, 32, 64), 0.5, axis=0)


def test_mixed_targets_clip_each_image_s_boxes_to_its_side_and_drop_slivers():
    first = target([[0.1, 0.1, 0.3, 0.2], [0.4, 0.3, 0.9, 0.5], [0.49, 0.6, 0.7, 0.9]], [0, 1, 2])
    second = target([[0.0, 0.0, 1.0, 1.0], [0.2, 0.4, 0.51, 0.6]], [3, 4])
    mixed = mix_targets(first, second, 0.5, axis=0)
    # first: kept whole; clipped to x <= 0.5; 0.01 wide left of the cut (under MIN_PART): dropped.
    # second: clipped to x >= 0.5; 0.01 wide right of the cut: dropped.
    expected = torch.tensor([[0.1, 0.1, 0.3, 0.2], [0.4, 0.3, 0.5, 0.5], [0.5, 0.0, 1.0, 1.0]])
    assert torch.allclose(mixed["boxes"], expected)
    assert mixed["labels"].tolist() == [0, 1, 3]
    assert mixed["size"] == first["size"]
    across_y = mix_targets(first, second, 0.5, axis=1)
    assert torch.allclose(across_y["boxes"], torch.tensor(
        [[0.1, 0.1, 0.3, 0.2], [0.4, 0.3, 0.9, 0.5], [0.0, 0.5, 1.0, 1.0], [0.2, 0.5, 0.51, 0.6]]))
    assert across_y["labels"].tolist() == [0, 1, 3, 4]
    assert MIN_PART == 1 / 32


def test_a_plan_pairs_images_of_one_class_and_does_not_depend_on_their_order():
    paths = [f"img_{i}.jpg" for i in range(12)]
    groups = [i % 3 for i in range(12)]
    plan = mix_plan("mix_x", paths, groups)
    for path, group in zip(paths, groups):
        partner = plan.partner[path]
        assert partner != path and groups[paths.index(partner)] == group
        assert plan.cut[path] in CUTS
    assert min(CUTS) == 0.375 and max(CUTS) == 0.625
    reordered = mix_plan("mix_x", paths[::-1], groups[::-1])
    assert reordered == plan and reordered.digest() == plan.digest()
    other_view = mix_plan("mix_y", paths, groups)
    assert other_view.axis == 1 and other_view.digest() != plan.digest()
    lonely = mix_plan("mix_x", ["a", "b", "c"], [0, 1, 1])
    assert lonely.partner["a"] in {"b", "c"}  # alone in its class: any other image
    with pytest.raises(ValueError, match="unknown mix view"):
        mix_plan("mix_z", paths, groups)


def test_mix_plans_group_by_each_image_s_main_class_and_skip_other_views():
    targets = [target([[0, 0, 1, 1]] * 2, [1, 1]), target([[0, 0, 1, 1]], [0]), target([[0, 0, 1, 1]], [1]),
               target([], [])]
    plans = mix_plans(("hflip", "mix_y"), ["a", "b", "c", "d"], targets)
    assert list(plans) == ["mix_y"]
    assert plans["mix_y"].partner["a"] == "c" and plans["mix_y"].partner["c"] == "a"


def test_feature_datasets_give_a_mix_view_the_target_of_both_images():
    targets = [target([[0.0, 0.0, 0.2, 1.0]], [0]), target([[0.6, 0.0, 1.0, 1.0]], [0])]
    plans = mix_plans(("mix_x",), ["a", "b"], targets)
    seen = []
    dataset = FeatureDataset(lambda index, view: seen.append((index, view)) or {"pooled": torch.zeros(2)},
                             targets, views=("mix_x",), mixes=Mixes(plans, ["a", "b"]))
    views = []
    for _ in range(20):
        _, item = dataset[0]
        views.append(seen[-1][1])
        if seen[-1][1] == "mix_x":
            assert item["labels"].tolist() == [0, 0]
            cut = plans["mix_x"].cut["a"]
            expected = torch.tensor([[0.0, 0.0, 0.2, 1.0], [max(0.6, cut), 0.0, 1.0, 1.0]])
            assert torch.allclose(item["boxes"], expected)
    assert set(views) == {"none", "mix_x"}
    with pytest.raises(ValueError, match="needs its plan"):
        FeatureDataset(lambda index, view: {}, targets, views=("mix_x",))


def test_image_datasets_join_the_pixels_of_an_image_and_its_partner(tmp_path):
    paths = make_images(tmp_path / "images", count=2)
    records = [Record(path=p, width=40, height=50, boxes=[[0, 0, 10, 50]], labels=["a"]) for p in paths]
    targets = [target([[0.0, 0.0, 0.25, 1.0]], [0])] * 2
    plans = mix_plans(("mix_y",), [str(p) for p in paths], targets)
    dataset = ImageDataset(records, targets, 32, views=("mix_y",), mixes=Mixes(plans, paths))
    images = [to_input_tensor(load_image(p), 32) for p in paths]
    cut = plans["mix_y"].cut[str(paths[0])]
    expected = mix_images(images[0], images[1], cut, axis=1)
    torch.manual_seed(0)
    got = [dataset[0][0] for _ in range(10)]
    assert any(torch.equal(image, expected) for image in got) and any(torch.equal(image, images[0]) for image in got)


def test_cached_mix_views_hold_the_mixed_images_features_keyed_by_their_plan(tmp_path):
    paths = make_images(tmp_path / "images", count=4)
    keys = [str(p) for p in paths]
    backbone = tiny_backbone()
    targets = [target([[0, 0, 1, 1]], [i % 2]) for i in range(4)]
    plans = mix_plans(("mix_x",), keys, targets)
    features = extract_features(backbone, paths, tmp_path / "cache", batch_size=3, views=("none", "mix_x"),
                                progress=False, mixes=plans)
    assert features.computed == {"none": 4, "mix_x": 4}
    images = {key: to_input_tensor(load_image(p), 32) for key, p in zip(keys, paths)}
    plan = plans["mix_x"]
    mixed = torch.stack([mix_images(images[key], images[plan.partner[key]], plan.cut[key], 0) for key in keys])
    with torch.no_grad():
        expected = backbone(mixed)
    np.testing.assert_allclose(features["mix_x"].pooled, expected["pooled"].numpy(), rtol=2e-3, atol=2e-3)
    meta = json.loads((features["mix_x"].directory / "meta.json").read_text())
    assert meta["mix"] == plan.digest()
    again = extract_features(backbone, paths, tmp_path / "cache", views=("mix_x",), progress=False, mixes=plans)
    assert again.computed == {"mix_x": 0}
    # Other classes pair the images differently: another entry, computed afresh.
    regrouped = mix_plans(("mix_x",), keys, [target([[0, 0, 1, 1]], [0])] * 4)
    if regrouped["mix_x"] != plan:
        other = extract_features(backbone, paths, tmp_path / "cache", views=("mix_x",), progress=False,
                                 mixes=regrouped)
        assert other.computed == {"mix_x": 4} and other["mix_x"].directory != features["mix_x"].directory
    with pytest.raises(ValueError, match="mix views with a plan"):
        extract_features(backbone, paths, tmp_path / "cache", views=("mix_y",), progress=False, mixes=plans)


def test_a_dense_run_trains_on_cached_mix_views(tmp_path):
    data = make_dataset(tmp_path / "NEU", images=18)
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "mix.yaml", data, cache, "dense",
                          model={"backbone": "vit_tiny_patch16_224", "input_size": 64,
                                 "head_kwargs": {"channels": 16, "num_convs": 1, "scales": [1.0, 0.5]}},
                          train={"epochs": 2, "augment": ["hflip", "mix_x", "mix_y"]})
    assert train(config, tmp_path / "runs") == 0
    views = {json.loads(meta.read_text())["view"] for meta in cache.glob("*/meta.json")}
    assert views == {"none", "hflip", "mix_x", "mix_y"}
    assert len(history(tmp_path / "runs" / "mix")) == 2


def test_mix_views_with_a_head_that_reads_the_image_are_a_one_line_config_error(tmp_path, capsys):
    data = make_dataset(tmp_path / "NEU", images=12)
    config = write_config(tmp_path / "detail.yaml", data, tmp_path / "cache", "dense",
                          model={"backbone": "vit_tiny_patch16_224", "input_size": 64,
                                 "head_kwargs": {"channels": 16, "num_convs": 1, "scales": [1.0, 0.5],
                                                 "detail_width": 4}},
                          train={"epochs": 1, "augment": ["mix_x"]})
    assert train(config, tmp_path / "runs") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "mix views (mix_x) are not supported" in error[0]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*/meta.json"))
