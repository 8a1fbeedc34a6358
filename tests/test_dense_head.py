"""Dense (FCOS-style) head: target assignment, loss, decoding, flips and NMS, on synthetic tensors."""
from __future__ import annotations

import math

import pytest
import torch

from metaldefect.data.dense_targets import BACKGROUND, dense_locations, encode_dense_targets
from metaldefect.data.transforms import view_boxes
from metaldefect.errors import ConfigError
from metaldefect.models.heads import create_head
from metaldefect.models.heads.dense import ContiguousGroupNorm, DenseHead

IN_DIMS = {"pooled": 16, "map": 16, "layers": [16, 16], "stride": 14}
CLASSES = ["a", "b", "c", "d"]


def encode(boxes, labels, points, strides, ranges, center_radius=1.5):
    """One image's targets: classes ``[L]`` and ltrb ``[L, 4]``."""
    classes, ltrb = encode_dense_targets([{"boxes": boxes, "labels": labels}], points, strides, ranges,
                                         center_radius)
    return classes[0], ltrb[0]


def test_known_box_gets_its_central_locations_class_and_distances():
    points, strides, ranges = dense_locations([(4, 4)])  # one level, stride 1/4, range [0, inf)
    boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    classes, ltrb = encode(boxes, torch.tensor([3]), points, strides, ranges, center_radius=1.5)
    grid = classes.reshape(4, 4)
    expected = torch.full((4, 4), BACKGROUND)
    expected[1:3, 1:3] = 3  # centres 0.375 and 0.625 lie inside the box
    assert torch.equal(grid, expected)
    # The location at (0.375, 0.375) is 0.125 = 0.5 strides from the left and top sides, 1.5 from the others.
    assert torch.allclose(ltrb.reshape(4, 4, 4)[1, 1], torch.tensor([0.5, 0.5, 1.5, 1.5]))
    assert torch.allclose(ltrb.reshape(4, 4, 4)[2, 1], torch.tensor([0.5, 1.5, 1.5, 0.5]))
    assert torch.equal(ltrb[classes == BACKGROUND], torch.zeros(12, 4))


def test_boxes_go_to_the_level_of_their_size_and_the_smaller_box_wins_overlaps():
    points, strides, ranges = dense_locations([(8, 8), (4, 4)], size_ranges=[(0.0, 0.25), (0.25, math.inf)])
    small = [0.40, 0.40, 0.60, 0.60]  # reach at most 0.2 from any inside point: level 0 only
    large = [0.0, 0.0, 1.0, 1.0]      # reach >= 0.5 everywhere: level 1 only
    classes, _ = encode(torch.tensor([large, small]), torch.tensor([0, 1]),
                          points, strides, ranges, center_radius=10.0)
    fine, coarse = classes[:64].reshape(8, 8), classes[64:].reshape(4, 4)
    assert torch.equal(fine[3:5, 3:5], torch.ones(2, 2, dtype=torch.long))  # the four centres inside `small`
    assert int((fine == 1).sum()) == 4 and int((fine == 0).sum()) == 0
    assert torch.equal(coarse, torch.zeros(4, 4, dtype=torch.long))


def test_a_box_thinner_than_the_stride_still_gets_the_location_nearest_its_centre():
    points, strides, ranges = dense_locations([(4, 4)])
    thin = torch.tensor([[0.52, 0.0, 0.56, 1.0]])  # between the centres 0.375 and 0.625
    classes, ltrb = encode(thin, torch.tensor([2]), points, strides, ranges)
    positive = torch.nonzero(classes == 2).flatten()
    assert positive.tolist() == [6]  # row 1 (y = 0.375, ties go to the first), column 2 (x = 0.625)
    # x = 0.625 lies 0.105 right of the left side and 0.065 beyond the right side.
    assert torch.allclose(ltrb[6], torch.tensor([0.42, 1.5, -0.26, 2.5]), atol=1e-5)


def test_an_image_without_boxes_is_all_background():
    points, strides, ranges = dense_locations([(4, 4), (2, 2)])
    classes, ltrb = encode(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                           points, strides, ranges)
    assert torch.equal(classes, torch.full((20,), BACKGROUND)) and not ltrb.any()


def test_a_batch_encodes_each_image_on_its_own():
    points, strides, ranges = dense_locations([(8, 8), (4, 4)])
    images = [{"boxes": torch.tensor([[0.1, 0.1, 0.9, 0.9]]), "labels": torch.tensor([0])},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
              {"boxes": torch.tensor([[0.3, 0.3, 0.6, 0.6], [0.7, 0.0, 0.72, 1.0]]), "labels": torch.tensor([1, 2])}]
    classes, ltrb = encode_dense_targets(images, points, strides, ranges)
    assert classes.shape == (3, 80) and ltrb.shape == (3, 80, 4)
    for i, image in enumerate(images):
        alone_classes, alone_ltrb = encode(image["boxes"], image["labels"], points, strides, ranges)
        assert torch.equal(classes[i], alone_classes) and torch.allclose(ltrb[i], alone_ltrb)
    assert set(classes[0].unique().tolist()) == {-1, 0} and set(classes[2].unique().tolist()) == {-1, 1, 2}


def test_flipped_boxes_give_mirrored_targets():
    points, strides, ranges = dense_locations([(8, 8), (4, 4)])
    boxes = torch.tensor([[0.07, 0.1, 0.47, 0.32], [0.61, 0.52, 0.91, 0.95]])  # no point on a region border
    labels = torch.tensor([0, 2])
    classes, ltrb = encode(boxes, labels, points, strides, ranges)
    h_classes, h_ltrb = encode(view_boxes(boxes, "hflip"), labels, points, strides, ranges)
    v_classes, v_ltrb = encode(view_boxes(boxes, "vflip"), labels, points, strides, ranges)
    for size, start in [(8, 0), (4, 64)]:
        level = slice(start, start + size * size)
        grid, h_grid, v_grid = (c[level].reshape(size, size) for c in (classes, h_classes, v_classes))
        assert torch.equal(h_grid, grid.flip(1)) and torch.equal(v_grid, grid.flip(0))
        dist = ltrb[level].reshape(size, size, 4)
        assert torch.allclose(h_ltrb[level].reshape(size, size, 4), dist.flip(1)[..., [2, 1, 0, 3]], atol=1e-5)
        assert torch.allclose(v_ltrb[level].reshape(size, size, 4), dist.flip(0)[..., [0, 3, 2, 1]], atol=1e-5)
    assert (classes >= 0).sum() > 0


def test_registered_head_outputs_have_the_documented_shapes():
    head = create_head("dense", IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[2, 1, 0.5, 0.25])
    assert isinstance(head, DenseHead) and head.task == "detect"
    features = {"layers": [torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)], "map": torch.randn(3, 16, 8, 8)}
    outputs = head(features)
    locations = 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2
    assert outputs["cls_logits"].shape == (3, locations, 4)
    assert outputs["box_ltrb"].shape == (3, locations, 4) and (outputs["box_ltrb"] >= 0).all()
    assert outputs["quality_logits"].shape == (3, locations)
    assert outputs["points"].shape == (3, locations, 2) and outputs["strides"].shape == (3, locations)
    assert torch.allclose(outputs["strides"][0, [0, 256, 320, 336]], torch.tensor([1 / 16, 1 / 8, 1 / 4, 1 / 2]))


@pytest.mark.parametrize("options", [{"score": "quality"}, {"score": "varifocal"}, {"score": "task_aligned"},
                                     {"box_bins": 16}], ids=["quality", "varifocal", "task_aligned", "box_bins"])
def test_loss_decreases_and_the_boxes_are_found_on_a_tiny_overfit_case(options):
    torch.manual_seed(0)
    head = DenseHead(IN_DIMS, num_classes=4, channels=32, num_convs=1, scales=[1, 0.5], **options)
    features = {"layers": [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)]}
    targets = [{"boxes": torch.tensor([[0.1, 0.2, 0.4, 0.6]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.5, 0.1, 0.9, 0.5], [0.0, 0.6, 1.0, 1.0]]), "labels": torch.tensor([3, 0])}]
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = head.loss(head(features), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    outputs = head(features)
    acc_sum, acc_count = head.metrics(outputs, targets)["pos_acc"]
    assert acc_count > 0 and acc_sum / acc_count == pytest.approx(1.0, abs=1e-3)
    detections = head.decode(outputs, [(100, 100), (100, 100)], CLASSES, score_threshold=0.3)
    found = {(d.label, tuple(round(v / 10) for v in d.box)) for image in detections for d in image}
    assert ("b", (1, 2, 4, 6)) in found and ("d", (5, 1, 9, 5)) in found and ("a", (0, 6, 10, 10)) in found


def _hand_made_outputs(head: DenseHead, hot: dict[int, tuple[int, list[float]]]) -> dict:
    """One image's outputs on a single 4x4 level: location -> (class, ltrb in strides); all else cold."""
    outputs = head({"layers": [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 4)]})
    cls_logits = torch.full_like(outputs["cls_logits"], -20.0)
    ltrb = torch.ones_like(outputs["box_ltrb"])
    for location, (label, distances) in hot.items():
        cls_logits[0, location, label] = 5.0
        ltrb[0, location] = torch.tensor(distances)
    return {**outputs, "cls_logits": cls_logits, "box_ltrb": ltrb,
            "quality_logits": torch.full_like(outputs["quality_logits"], 5.0)}


def test_decode_gives_absolute_pixels_of_the_original_image():
    head = DenseHead(IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[1])
    # Location 5 is row 1, column 1: centre (0.375, 0.375); stride 0.25.
    outputs = _hand_made_outputs(head, {5: (2, [1.0, 0.5, 2.0, 1.5])})
    (detections,) = head.decode(outputs, [(400, 200)], CLASSES, score_threshold=0.5)
    assert len(detections) == 1 and detections[0].label == "c"
    # normalised box: x 0.375 - 0.25 .. 0.375 + 0.5, y 0.375 - 0.125 .. 0.375 + 0.375
    assert detections[0].box == pytest.approx([50.0, 50.0, 350.0, 150.0], abs=1e-3)
    assert detections[0].score == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), abs=1e-5)


def test_nms_merges_duplicates_of_a_class_but_keeps_other_classes():
    head = DenseHead(IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[1])
    # Locations 5 and 6 (centres x 0.375 and 0.625, same row) describe nearly the same box.
    same = {5: (1, [1.0, 1.0, 2.0, 1.0]), 6: (1, [2.0, 1.0, 1.0, 1.0])}
    (detections,) = head.decode(_hand_made_outputs(head, same), [(100, 100)], CLASSES, score_threshold=0.5)
    assert len(detections) == 1 and detections[0].box == pytest.approx([12.5, 12.5, 87.5, 62.5], abs=1e-3)
    other_class = {5: (1, [1.0, 1.0, 2.0, 1.0]), 6: (3, [2.0, 1.0, 1.0, 1.0])}
    (detections,) = head.decode(_hand_made_outputs(head, other_class), [(100, 100)], CLASSES, score_threshold=0.5)
    assert sorted(d.label for d in detections) == ["b", "d"]


def test_varifocal_head_scores_with_its_class_logits_alone():
    head = DenseHead(IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[1], score="varifocal")
    assert head.quality is None and not any("quality" in name for name in head.state_dict())
    outputs = head({"layers": [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 4)]})
    assert "quality_logits" not in outputs
    losses = head.loss(outputs, [{"boxes": torch.tensor([[0.1, 0.1, 0.6, 0.6]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"loss", "loss_cls", "loss_box"}
    cls_logits = torch.full_like(outputs["cls_logits"], -20.0)
    cls_logits[0, 5, 2] = 1.0
    (detections,) = head.decode({**outputs, "cls_logits": cls_logits}, [(100, 100)], CLASSES, score_threshold=0.5)
    assert len(detections) == 1 and detections[0].score == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_varifocal_loss_known_answer_weights_positives_by_their_iou():
    head = DenseHead(IN_DIMS, num_classes=1, channels=16, num_convs=1, scales=[1], score="varifocal")
    outputs = head({"layers": [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 4)]})
    # Every location predicts 1 stride (0.25) to every side: a 0.5 x 0.5 box around its centre.
    ltrb = torch.full_like(outputs["box_ltrb"], 1.0)
    logits = torch.full_like(outputs["cls_logits"], -1.0)
    target = [{"boxes": torch.tensor([[0.125, 0.125, 0.625, 0.875]]), "labels": torch.tensor([0])}]
    classes, _, _ = head.encode_targets(outputs, target)
    positive = classes[0] >= 0
    losses = head.loss({**outputs, "cls_logits": logits, "box_ltrb": ltrb}, target)
    p = torch.sigmoid(torch.tensor(-1.0))
    assert positive.sum() >= 2
    expected = 0.0  # positives: iou * BCE(p, iou); negatives: 0.75 * p^2 * BCE(p, 0)
    for location in torch.nonzero(positive).flatten().tolist():
        x, y = outputs["points"][0, location].tolist()
        box = [x - 0.25, y - 0.25, x + 0.25, y + 0.25]
        inter = max(0.0, min(box[2], 0.625) - max(box[0], 0.125)) * max(0.0, min(box[3], 0.875) - max(box[1], 0.125))
        iou = inter / (0.25 + 0.375 - inter)
        expected += iou * -(iou * math.log(p) + (1 - iou) * math.log(1 - p))
    negatives = 16 - int(positive.sum())
    expected += negatives * 0.75 * float(p) ** 2 * -math.log(1 - p)
    assert losses["loss_cls"].item() == pytest.approx(expected / int(positive.sum()), rel=1e-5)


def test_box_bins_predict_distances_as_the_expectation_of_a_distribution():
    head = DenseHead(IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[1, 0.5], box_bins=16)
    outputs = head({"layers": [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)]})
    logits = outputs["box_bin_logits"]
    assert logits.shape == (2, 16 + 4, 4, 16)
    expected = (logits.softmax(dim=-1) * torch.arange(16.0)).sum(dim=-1)
    assert torch.allclose(outputs["box_ltrb"], expected, atol=1e-5)
    assert head.level_scales is None  # a distribution's range is fixed by its bins


def test_distribution_focal_loss_known_answer():
    head = DenseHead(IN_DIMS, num_classes=1, channels=16, num_convs=1, scales=[1], box_bins=4)
    outputs = head({"layers": [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 4)]})
    target = [{"boxes": torch.tensor([[0.125, 0.125, 0.625, 0.875]]), "labels": torch.tensor([0])}]
    classes, ltrb, _ = head.encode_targets(outputs, target)
    positive = classes[0] >= 0
    # Every side's distribution is [0.1, 0.2, 0.3, 0.4] over 0..3 strides.
    probabilities = torch.tensor([0.1, 0.2, 0.3, 0.4])
    bin_logits = probabilities.log().expand_as(outputs["box_bin_logits"]).clone()
    losses = head.loss({**outputs, "box_bin_logits": bin_logits}, target)
    expected = 0.0  # per side: -(w_left log p[i] + w_right log p[i+1]) for a target between i and i + 1
    for distances in ltrb[0, positive].tolist():
        for t in distances:
            t = min(max(t, 0.0), 3 - 1e-4)
            i = int(t)
            expected += -((i + 1 - t) * math.log(probabilities[i]) + (t - i) * math.log(probabilities[i + 1])) / 4
    assert positive.sum() >= 2
    assert losses["loss_dfl"].item() == pytest.approx(expected / int(positive.sum()), rel=1e-5)
    assert "loss_dfl" not in DenseHead(IN_DIMS, num_classes=1, channels=16, num_convs=1, scales=[1]).loss(
        outputs, target)


@pytest.mark.parametrize("bins", [-1, 1])
def test_box_bins_must_be_zero_or_at_least_two(bins):
    with pytest.raises(ConfigError, match="box_bins"):
        DenseHead(IN_DIMS, num_classes=1, box_bins=bins)


def test_dropout_acts_while_training_only():
    torch.manual_seed(0)
    head = DenseHead(IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[1], dropout=0.5)
    plain = DenseHead(IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[1])
    plain.load_state_dict(head.state_dict())
    features = {"layers": [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)]}
    plain.eval()
    expected = plain(features)["box_ltrb"]
    assert torch.equal(head.eval()(features)["box_ltrb"], expected)
    assert not torch.allclose(head.train()(features)["box_ltrb"], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_on_a_channels_last_input_is_stock_group_norm(dtype):
    """The towers' GroupNorm normalises a contiguous copy of a channels-last input (torch's channels-last bf16
    kernel is slow on CPU): the same values and gradients as ``nn.GroupNorm``, and the same weight names."""
    torch.manual_seed(0)
    ours, stock = ContiguousGroupNorm(8, 32), torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(4, 32, 6, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    grads = []
    for norm in (ours.to(dtype), stock.to(dtype)):
        inputs = x.clone().requires_grad_(True)
        out = norm(inputs)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.float(), inputs.grad.float(), norm.weight.grad.float()))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, expected in zip(*grads):
        assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance)
    tower = DenseHead({"pooled": 16, "map": 16, "stride": 16}, 3, channels=16, num_convs=2).cls_tower
    assert [type(m) for m in tower] == [torch.nn.Conv2d, ContiguousGroupNorm, torch.nn.ReLU] * 2


def test_the_neck_fuses_in_the_autocast_dtype_and_in_float32_outside_it():
    """Under bf16 autocast the normalised layers are cast before the concatenation (the fuse convolution reads
    bf16 anyway), with outputs close to float32's; without autocast the fuse convolution reads float32."""
    torch.manual_seed(0)
    head = DenseHead(IN_DIMS, num_classes=4, channels=16, num_convs=1, scales=[1, 0.5]).eval()
    seen = []
    head.neck.fuse.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].dtype))
    features = {"layers": [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)]}
    expected = head(features)["box_ltrb"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = head(features)["box_ltrb"].float()
    assert seen == [torch.float32, torch.bfloat16]
    assert torch.allclose(lowered, expected, atol=0.05, rtol=0.05) and not torch.equal(lowered, expected)
