"""Heads, encoders, flips and the Hungarian matcher: shapes, known answers, and order-free learning."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaldefect.config import AUGMENTATIONS
from metaldefect.data.encoders import encode_first_object, encode_image_labels, encode_slots, image_label, make_target
from metaldefect.data.mixing import MIX_VIEWS
from metaldefect.data.records import Record
from metaldefect.data.transforms import SHIFT, VIEW_STEPS, VIEWS, view_boxes, view_image, view_target
from metaldefect.errors import ConfigError, DataError
from metaldefect.models.heads import create_head, list_heads
from metaldefect.models.matcher import HungarianMatcher

IN_DIMS = {"pooled": 8, "map": 8, "map_size": (4, 4), "layers": [8], "stride": 16}


def features(batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pooled": torch.randn(batch, 8, generator=generator), "map": torch.randn(batch, 8, 4, 4, generator=generator)}


def target(boxes, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "size": (100, 50)}


# ---------------------------------------------------------------- encoders and flips

def test_make_target_normalises_by_width_and_height():
    record = Record("a.jpg", 200, 100, boxes=[[20, 10, 100, 50]], labels=["b"])
    out = make_target(record, {"a": 0, "b": 1})
    assert torch.allclose(out["boxes"], torch.tensor([[0.1, 0.1, 0.5, 0.5]]))
    assert out["labels"].tolist() == [1] and out["size"] == (200, 100)
    with pytest.raises(DataError, match="'b' is not in the run's class list"):
        make_target(record, {"a": 0})


def test_image_label_is_the_majority_then_the_first_listed():
    assert image_label(["a", "b", "b"]) == "b"
    assert image_label(["c", "a", "a", "c"]) == "c"
    assert image_label([]) is None
    labels = encode_image_labels([target([[0, 0, 1, 1]] * 3, [2, 1, 1]), target([], [])])
    assert labels.tolist() == [1, -1]


def test_first_object_and_padded_slots():
    targets = [target([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6]], [2, 0]), target([], [])]
    labels, boxes, present = encode_first_object(targets)
    assert labels.tolist() == [2, -1] and present.tolist() == [True, False]
    assert torch.allclose(boxes[0], torch.tensor([0.1, 0.2, 0.3, 0.4])) and boxes[1].abs().sum() == 0
    labels, boxes, real = encode_slots(targets, num_slots=3, no_defect=5)
    assert labels.tolist() == [[2, 0, 5], [5, 5, 5]]
    assert real.tolist() == [[True, True, False], [False, False, False]]
    assert boxes[0, 2].abs().sum() == 0 and torch.allclose(boxes[0, 1], torch.tensor([0.5, 0.5, 0.6, 0.6]))
    with pytest.raises(ValueError, match="3 objects but the model has only 2 slots"):
        encode_slots([target([[0, 0, 1, 1]] * 3, [0, 0, 0])], num_slots=2, no_defect=1)


@pytest.mark.parametrize("view", VIEWS)
def test_views_move_boxes_with_the_image(view):
    image = torch.zeros(1, 32, 64)  # a shift view moves it by whole pixels (shift_rd: 2 right, 1 down)
    image[0, 4:12, 8:24] = 1.0  # a box x 8..24 of 64, y 4..12 of 32
    box = torch.tensor([[8 / 64, 4 / 32, 24 / 64, 12 / 32]])
    seen, moved = view_image(image, view), view_boxes(box, view)
    height, width = seen.shape[1:]
    x1, y1, x2, y2 = (moved[0] * torch.tensor([width, height, width, height])).round().int().tolist()
    assert seen[0, y1:y2, x1:x2].sum() == (x2 - x1) * (y2 - y1) == seen.sum() == 128


def test_views_are_the_eight_symmetries_of_a_square():
    image = torch.arange(16.0).view(1, 4, 4)
    seen = {view: view_image(image, view) for view in VIEW_STEPS}
    assert len({tuple(x.flatten().tolist()) for x in seen.values()}) == 8
    assert torch.equal(seen["rot90"], torch.from_numpy(np.rot90(image.numpy(), 1, axes=(1, 2)).copy()))
    assert torch.equal(seen["rot270"], torch.from_numpy(np.rot90(image.numpy(), 3, axes=(1, 2)).copy()))
    assert set(AUGMENTATIONS) == set(VIEWS) - {"none"} | set(MIX_VIEWS)  # what a config may ask for
    original = target([[0.1, 0.2, 0.3, 0.4]], [1])
    assert view_target(original, "none") is original
    assert torch.allclose(view_target(original, "vflip")["boxes"], torch.tensor([[0.1, 0.6, 0.3, 0.8]]))
    assert torch.allclose(view_target(original, "rot90")["boxes"], torch.tensor([[0.2, 0.7, 0.4, 0.9]]))


def test_shift_views_fill_the_border_with_the_edge_and_drop_boxes_pushed_out():
    image = torch.arange(64.0 * 64).view(1, 64, 64)
    seen = view_image(image, "shift_rd")  # 2 px right and down
    assert torch.equal(seen[:, 2:, 2:], image[:, :62, :62])
    assert torch.equal(seen[:, 2:, 0], image[:, :62, 0]) and torch.equal(seen[:, 0, 2:], image[:, 0, :62])
    # The first box is clipped at the right side; the second lies wholly in the last 1/32 and leaves.
    original = target([[0.5, 0.1, 0.99, 0.2], [0.975, 0.3, 1.0, 0.4], [0.1, 0.5, 0.2, 0.6]], [1, 2, 3])
    shifted = view_target(original, "shift_r")
    assert shifted["labels"].tolist() == [1, 3]
    expected = torch.tensor([[0.5 + SHIFT, 0.1, 1.0, 0.2], [0.1 + SHIFT, 0.5, 0.2 + SHIFT, 0.6]])
    assert torch.allclose(shifted["boxes"], expected)


def test_composite_views_flip_then_shift_and_drop_boxes_pushed_out():
    image = torch.arange(64.0 * 64).view(1, 64, 64)
    for flip in ("hflip", "vflip", "rot180"):
        assert torch.equal(view_image(image, f"{flip}+shift_rd"), view_image(view_image(image, flip), "shift_rd"))
    # hflip sends the box at x 0..0.02 to x 0.98..1.0, and the shift right then pushes it out.
    original = target([[0.0, 0.1, 0.02, 0.2], [0.1, 0.5, 0.2, 0.6]], [1, 3])
    seen = view_target(original, "hflip+shift_r")
    assert seen["labels"].tolist() == [3]
    assert torch.allclose(seen["boxes"], torch.tensor([[0.8 + SHIFT, 0.5, 0.9 + SHIFT, 0.6]]))
    with pytest.raises(ValueError, match="unknown view 'shift_r\\+hflip'"):
        view_image(image, "shift_r+hflip")  # only the listed composites: a flip, then a shift


@pytest.mark.parametrize("view, right, down", [("shift_r", 7, 0), ("shift_rd_quarter", 4, 4),
                                               ("shift_rd_3quarter", 10, 10)])
def test_shift_views_move_whole_pixels_at_224(view, right, down):
    # Image and boxes must move by the same amount, or the targets would be off by a fraction of a pixel.
    image = torch.arange(224.0 * 224).view(1, 224, 224)
    assert torch.equal(view_image(image, view)[:, down:, right:], image[:, :224 - down, :224 - right])
    box = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    expected = torch.tensor([56.0 + right, 56 + down, 112 + right, 112 + down])
    assert torch.allclose(view_boxes(box, view)[0] * 224, expected)


# ---------------------------------------------------------------- registry

def test_registry_knows_every_head_and_rejects_bad_options():
    assert {"classifier", "single", "slots", "dense"} <= set(list_heads())
    with pytest.raises(ConfigError, match="unknown head 'slot'"):
        create_head("slot", IN_DIMS, 3)
    with pytest.raises(ConfigError, match="unknown option 'num_slot'"):
        create_head("slots", IN_DIMS, 3, num_slot=4)
    with pytest.raises(ConfigError, match="head input 'tokens'"):
        create_head("classifier", IN_DIMS, 3, inputs="tokens")


@pytest.mark.parametrize("inputs, grid, width", [("pooled", None, 8), ("map", None, 128), ("map", 2, 32),
                                                 ("pooled+map", 2, 40)])
def test_feature_inputs_flatten_what_they_say(inputs, grid, width):
    head = create_head("classifier", IN_DIMS, 3, inputs=inputs, grid=grid)
    assert head.classify.in_features == width
    assert head(features(2))["logits"].shape == (2, 3)


# ---------------------------------------------------------------- classifier

def test_classifier_loss_metrics_and_decode_known_answers():
    head = create_head("classifier", IN_DIMS, 3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    outputs = {"logits": logits}
    targets = [target([[0, 0, 1, 1]], [0]), target([[0, 0, 1, 1]], [1]), target([], [])]
    expected = F.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert head.loss(outputs, targets)["loss"].item() == pytest.approx(expected.item())
    metrics = head.metrics(outputs, targets)
    assert metrics["accuracy"] == (1, 2.0)  # image 3 has no label and is not counted
    assert metrics["cce"][0] == pytest.approx(expected.item() * 2)
    true, predicted = head.confusion(outputs, targets)
    assert true.tolist() == [0, 1] and predicted.tolist() == [0, 2]
    decoded = head.decode(outputs, [(10, 10)] * 3, ["a", "b", "c"], score_threshold=0.2)
    assert [name for name, _ in decoded[1]] == ["c"]
    assert decoded[0][0][0] == "a" and decoded[0][0][1] == pytest.approx(logits[0].softmax(0)[0].item())


# ---------------------------------------------------------------- single defect

def test_single_defect_head_paths_and_metrics():
    head = create_head("single", IN_DIMS, 4)
    widths = [m.out_features for m in head.class_path if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 64, 4]  # the paper's class path 128-64-C
    assert [m.out_features for m in head.box_path if isinstance(m, torch.nn.Linear)] == [128, 64, 4]
    outputs = {"logits": torch.tensor([[0.0, 5.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]),
               "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])}
    targets = [target([[0.1, 0.1, 0.5, 0.7], [0, 0, 1, 1]], [1, 3]), target([], [])]  # only the first object counts
    metrics = head.metrics(outputs, targets)
    assert metrics["accuracy"] == (1, 1.0)
    assert metrics["mse"][0] / metrics["mse"][1] == pytest.approx(0.2 ** 2 / 4)
    assert metrics["mae"][0] / metrics["mae"][1] == pytest.approx(0.2 / 4)
    assert metrics["iou"][0] == pytest.approx(0.16 / 0.24)
    losses = head.loss(outputs, targets)
    assert losses["loss_box"].item() == pytest.approx(0.01)
    detections = head.decode(outputs, [(200, 100), (10, 10)], ["a", "b", "c", "d"], score_threshold=0.5)
    assert detections[0][0].label == "b" and detections[0][0].box == pytest.approx([20.0, 10.0, 100.0, 50.0])


# ---------------------------------------------------------------- slots

def slot_outputs(classes: list[list[int]], boxes: list, num_classes: int, confidence: float = 8.0) -> dict:
    """Confident logits for the given slot classes, and the given boxes."""
    logits = F.one_hot(torch.tensor(classes), num_classes + 1).float() * confidence
    return {"logits": logits, "boxes": torch.tensor(boxes, dtype=torch.float32)}


def test_slot_head_shapes_paper_layers_and_per_slot_softmax():
    head = create_head("slots", IN_DIMS, 11, num_slots=11)
    assert [m.out_features for m in head.class_path if isinstance(m, torch.nn.Linear)] == [1024, 512, 512, 256, 132]
    assert [m.out_features for m in head.box_path if isinstance(m, torch.nn.Linear)] == [128, 128, 64, 64, 44]
    assert sum(isinstance(m, torch.nn.Dropout) for m in head.box_path) == 2
    outputs = head(features(3))
    assert outputs["logits"].shape == (3, 11, 12) and outputs["boxes"].shape == (3, 11, 4)
    # One softmax per slot: with all logits equal each slot's class probabilities are 1 / (C + 1)
    # (a softmax over all K * (C + 1) units, the authors' bug, would give 1 / (K * (C + 1))).
    flat = {"logits": torch.zeros(1, 11, 12), "boxes": torch.zeros(1, 11, 4)}
    detections = head.decode(flat, [(1, 1)], [str(i) for i in range(11)])[0]
    assert len(detections) == 11  # threshold 0: every slot, ranked by score
    assert [d.score for d in detections] == pytest.approx([1 / 12] * 11)
    loss = head.loss(flat, [target([[0.1, 0.1, 0.2, 0.2]], [3])])["loss_cls"]
    assert loss.item() == pytest.approx(torch.log(torch.tensor(12.0)).item())


def test_ordered_slot_metrics_count_padding_only_in_slot_acc_all():
    head = create_head("slots", IN_DIMS, 2, num_slots=4)  # "no defect" = 2
    boxes = [[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0, 0, 0, 0], [0.2, 0.2, 0.3, 0.3]]]
    outputs = slot_outputs([[0, 0, 2, 2]], boxes, num_classes=2)  # slot 1 wrong class, slot 3 right "no defect"
    targets = [target([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.7]], [0, 1])]
    metrics = {k: v[0] / v[1] for k, v in head.metrics(outputs, targets).items()}
    assert metrics["slot_acc_real"] == metrics["accuracy"] == 0.5
    assert metrics["slot_acc_all"] == 0.75
    assert metrics["mse"] == pytest.approx(0.2 ** 2 / 8)  # real slots: one coordinate off by 0.2
    assert metrics["mae"] == pytest.approx(0.2 / 8)
    # The authors' padded errors also count slot 3's box against a zero box.
    assert metrics["mse_all"] == pytest.approx((0.2 ** 2 + 2 * 0.2 ** 2 + 2 * 0.3 ** 2) / 16)
    # Box loss on real slots only: the stray slot-3 box costs nothing.
    assert head.loss(outputs, targets)["loss_box"].item() == pytest.approx(0.2 ** 2 / 8)
    detections = head.decode(outputs, [(100, 100)], ["a", "b"], score_threshold=0.5)[0]
    assert [d.label for d in detections] == ["a", "a"]
    true, predicted = head.confusion(outputs, targets)
    assert true.tolist() == [0, 1, 2, 2] and predicted.tolist() == [0, 0, 2, 2]


def test_hungarian_matching_ignores_the_listing_order():
    boxes = [[[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.4, 0.4], [0, 0, 0.1, 0.1]]]
    outputs = slot_outputs([[1, 0, 2]], boxes, num_classes=2)  # right objects, other order
    targets = [target([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]], [0, 1])]
    ordered = create_head("slots", IN_DIMS, 2, num_slots=3, matching="ordered")
    hungarian = create_head("slots", IN_DIMS, 2, num_slots=3, matching="hungarian")
    assert ordered.metrics(outputs, targets)["slot_acc_real"] == (0, 2.0)
    metrics = hungarian.metrics(outputs, targets)
    assert metrics["slot_acc_real"] == (2, 2.0) and metrics["slot_acc_all"] == (3, 3.0)
    assert metrics["mse"][0] == pytest.approx(0.0, abs=1e-9)
    assert hungarian.loss(outputs, targets)["loss_box"].item() == pytest.approx(0.0, abs=1e-7)


def test_matcher_finds_the_cheapest_assignment():
    matcher = HungarianMatcher(cost_class=1.0, cost_box=5.0, cost_giou=2.0)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 3, generator=generator)
    xy = torch.rand(1, 4, 2, generator=generator) * 0.5
    outputs = {"logits": logits, "boxes": torch.cat([xy, xy + 0.3], -1)}
    true_xy = torch.rand(3, 2, generator=generator) * 0.5
    targets = [{"labels": torch.tensor([0, 1, 1]), "boxes": torch.cat([true_xy, true_xy + 0.2], -1)}]
    slots, objects = matcher(outputs, targets)[0]

    from torchvision.ops import generalized_box_iou
    prob = logits[0].softmax(-1)
    cost = (-prob[:, targets[0]["labels"]] + 5 * torch.cdist(outputs["boxes"][0], targets[0]["boxes"], p=1)
            - 2 * generalized_box_iou(outputs["boxes"][0], targets[0]["boxes"]))
    best = min(itertools.permutations(range(4), 3), key=lambda p: sum(cost[p[j], j] for j in range(3)))
    assert sorted(zip(objects.tolist(), slots.tolist())) == [(j, best[j]) for j in range(3)]
    assert matcher(outputs, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])[0][0].numel() == 0


def test_hungarian_learns_unordered_sets_that_the_paper_order_cannot():
    """Objects listed in random order: only order-free matching can learn which slot holds what."""
    torch.manual_seed(0)
    scenes = 6
    in_dims = {"pooled": scenes, "map": 1, "map_size": (1, 1), "layers": [], "stride": 1}
    corners = torch.rand(scenes, 2, 2) * 0.5
    boxes = torch.cat([corners, corners + 0.4], -1)  # [scene, object, 4]
    labels = torch.stack([torch.arange(2) + 2 * (s % 2) for s in range(scenes)])  # 2 distinct classes per scene

    def batch(generator):
        ids = torch.randint(scenes, (24,), generator=generator)
        targets = []
        for s in ids.tolist():
            order = torch.randperm(2, generator=generator)
            targets.append({"boxes": boxes[s][order], "labels": labels[s][order]})
        return {"pooled": F.one_hot(ids, scenes).float(), "map": torch.zeros(24, 1, 1, 1)}, targets

    accuracy = {}
    for matching in ("ordered", "hungarian"):
        head = create_head("slots", in_dims, 4, num_slots=2, matching=matching, class_layers=[32],
                           box_layers=[32], box_dropout=0.0, box_activation="sigmoid")
        optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(1)
        for _ in range(150):
            inputs, targets = batch(generator)
            loss = head.loss(head(inputs), targets)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        inputs, targets = batch(generator)
        correct, count = head.metrics(head(inputs), targets)["slot_acc_real"]
        accuracy[matching] = correct / count
    assert accuracy["hungarian"] > 0.95
    assert accuracy["ordered"] < 0.8
