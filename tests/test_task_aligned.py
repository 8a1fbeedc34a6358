"""Task-aligned assignment: which points become positives, who owns a shared point, the soft targets."""
from __future__ import annotations

import pytest
import torch

from metaldefect.data.dense_targets import BACKGROUND, dense_locations
from metaldefect.models.heads.task_aligned import task_aligned_targets

# One 4x4 level: points at 0.125, 0.375, 0.625, 0.875 on each axis, stride 0.25.
POINTS, STRIDES, _ = dense_locations([(4, 4)])


def location(column: int, row: int) -> int:
    return row * 4 + column


def assign(probabilities, boxes, targets, top_k):
    classes, ltrb, scores = task_aligned_targets(probabilities[None], boxes[None], POINTS, STRIDES,
                                                 [targets], top_k=top_k)
    return classes[0], ltrb[0], scores[0]


def test_the_best_aligned_points_inside_the_box_win_and_their_targets_are_rescaled():
    box = torch.tensor([0.0, 0.0, 0.5, 0.5])                       # holds points (0,0) (1,0) (0,1) (1,1)
    probabilities = torch.full((16, 2), 0.25)
    boxes = torch.tensor([0.6, 0.6, 1.0, 1.0]).repeat(16, 1)        # misses the box
    boxes[location(0, 0)] = box                                     # IoU 1
    boxes[location(1, 1)] = torch.tensor([0.0, 0.0, 0.5, 0.25])     # IoU 0.5
    boxes[location(3, 3)] = box                                     # IoU 1 but outside the box: not a candidate
    classes, ltrb, scores = assign(probabilities, boxes, {"boxes": box[None], "labels": torch.tensor([1])}, top_k=2)
    assert torch.nonzero(classes >= 0).flatten().tolist() == [location(0, 0), location(1, 1)]
    assert (classes[classes >= 0] == 1).all() and (classes[classes < 0] == BACKGROUND).all()
    # alignment = p^0.5 * IoU^6: 0.5 and 0.5 * 0.5^6; rescaled so the best equals the best IoU (1).
    assert scores[location(0, 0)] == pytest.approx(1.0)
    assert scores[location(1, 1)] == pytest.approx(0.5 ** 6)
    assert scores.sum() == pytest.approx(1.0 + 0.5 ** 6)
    # Point (1, 1) sits at (0.375, 0.375): 1.5 strides from the left and top sides, 0.5 from the others.
    assert ltrb[location(1, 1)].tolist() == pytest.approx([1.5, 1.5, 0.5, 0.5])


def test_a_point_wanted_by_two_boxes_goes_to_the_box_its_prediction_overlaps_most():
    boxes_gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]])  # both hold point (1, 1)
    probabilities = torch.full((16, 3), 0.5)
    boxes = torch.zeros(16, 4)
    boxes[location(1, 1)] = torch.tensor([0.25, 0.25, 0.75, 0.7])  # overlaps the second box far more
    classes, _, scores = assign(probabilities, boxes, {"boxes": boxes_gt, "labels": torch.tensor([0, 2])}, top_k=1)
    assert classes[location(1, 1)] == 2
    assert scores[location(1, 1)] == pytest.approx(0.9)            # IoU with its owner: 0.225 / 0.25


def test_a_thin_box_between_points_still_gets_a_positive():
    thin = torch.tensor([[0.45, 0.0, 0.55, 1.0]])                    # no point centre inside (x 0.375 / 0.625)
    probabilities = torch.full((16, 1), 0.5)
    boxes = torch.tensor([0.4, 0.0, 0.6, 1.0]).repeat(16, 1)
    classes, _, scores = assign(probabilities, boxes, {"boxes": thin, "labels": torch.tensor([0])}, top_k=4)
    positives = torch.nonzero(classes >= 0).flatten().tolist()
    assert positives and all(int(POINTS[i, 0] * 8) in (3, 5) for i in positives)
    assert scores.max() == pytest.approx(0.5)                       # IoU of 0.1 x 1 with 0.2 x 1


def test_an_image_without_boxes_is_all_background():
    classes, ltrb, scores = assign(torch.rand(16, 2), torch.rand(16, 4).sort(dim=1).values,
                                   {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}, top_k=3)
    assert (classes == BACKGROUND).all() and not ltrb.any() and not scores.any()
