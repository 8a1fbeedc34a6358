"""Detection metrics with known answers, and agreement with pycocotools run directly."""
from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from metaldefect.data.records import Detection, Record
from metaldefect.engine.coco_eval import coco_map, evaluate_detections
from metaldefect.engine.detection_plots import plot_detection_confusion, plot_pr_curves
from metaldefect.errors import DataError

CLASSES = ["crazing", "inclusion", "scratches"]
A, B, C = CLASSES
BG = len(CLASSES)  # background index in the confusion matrix


def record(i: int, boxes=(), labels=()) -> Record:
    return Record(f"img{i}.jpg", 200, 200, [list(b) for b in boxes], list(labels))


def square(x: float, y: float, size: float = 100.0) -> list[float]:
    return [x, y, x + size, y + size]


def close(actual, expected) -> bool:
    """Equal to 1e-12, element by element, None only where None is expected.

    COCOeval computes precision as tp / (tp + fp + eps), so a perfect AP is 1 - 2e-16."""
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(close(a, e) for a, e in zip(actual, expected))
    if expected is None or actual is None:
        return actual is expected
    return abs(actual - expected) <= 1e-12


def perfect(records: list[Record]) -> list[list[Detection]]:
    return [[Detection(box, label, 1.0) for box, label in zip(r.boxes, r.labels)] for r in records]


def test_perfect_predictions_score_one_everywhere():
    gts = [record(0, [square(10, 10), square(50, 60, 40)], [A, B]),
           record(1, [square(0, 0, 30), square(100, 100, 80), square(5, 120, 60)], [C, A, A]),
           record(2)]
    report = evaluate_detections(gts, perfect(gts), CLASSES)
    assert close(report.map50, 1.0) and close(report.map, 1.0)
    assert close(report.ap50, [1.0, 1.0, 1.0]) and close(report.ap, [1.0, 1.0, 1.0])
    assert report.precision == 1.0 and report.recall == 1.0
    assert report.class_precision == [1.0, 1.0, 1.0] and report.class_recall == [1.0, 1.0, 1.0]
    assert report.ground_truth_counts == [3, 1, 1] and report.true_positives == [3, 1, 1]
    assert np.array_equal(report.confusion, np.diag([3, 1, 1, 0]))
    assert close(report.pr_curves[0], [1.0] * 101) and len(report.recall_grid) == 101


# IoU of a 100x100 box shifted by d pixels = (100 - d) / (100 + d); thresholds 0.50:0.05:0.95.
@pytest.mark.parametrize("shift, thresholds_passed", [
    (0, 10),   # IoU 1
    (3, 9),    # 0.9417: passes 0.50 ... 0.90
    (10, 7),   # 0.8182: passes 0.50 ... 0.80
    (20, 4),   # 0.6667: passes 0.50 ... 0.65
    (30, 1),   # 0.5385: passes 0.50 only
    (35, 0),   # 0.4815: passes none
])
@pytest.mark.parametrize("axis", [0, 1])
def test_shifted_box_gives_the_iou_determined_map(shift, thresholds_passed, axis):
    gts = [record(0, [square(40, 40)], [A])]
    box = square(40, 40)
    box[axis] += shift
    box[axis + 2] += shift
    report = evaluate_detections(gts, [[Detection(box, A, 0.9)]], CLASSES)
    assert close(report.map, thresholds_passed / 10)
    assert close(report.map50, 1.0 if thresholds_passed else 0.0)
    assert close(report.ap, [thresholds_passed / 10, None, None])  # no ground truth, no AP
    hit = thresholds_passed > 0
    assert (report.precision, report.recall) == ((1.0, 1.0) if hit else (0.0, 0.0))
    expected = np.zeros((4, 4), dtype=int)
    if hit:
        expected[0, 0] = 1
    else:
        expected[0, BG] = expected[BG, 0] = 1  # a miss and a false detection
    assert np.array_equal(report.confusion, expected)


def test_two_classes_with_different_shifts_average():
    gts = [record(0, [square(0, 0)], [A]), record(1, [square(0, 0)], [B])]
    preds = [[Detection(square(3, 0), A, 0.8)], [Detection(square(0, 20), B, 0.8)]]
    report = evaluate_detections(gts, preds, CLASSES)
    assert close(report.ap, [0.9, 0.4, None])
    assert close(report.map, 0.65) and close(report.map50, 1.0)


def test_wrong_class_is_off_diagonal_and_zero_ap():
    gts = [record(0, [square(10, 10)], [A]), record(1, [square(20, 20)], [B])]
    preds = [[Detection(square(10, 10), B, 0.5)], [Detection(square(20, 20), B, 0.9)]]
    report = evaluate_detections(gts, preds, CLASSES)
    assert close(report.ap50, [0.0, 1.0, None]) and close(report.ap, [0.0, 1.0, None])
    assert close(report.map50, 0.5) and close(report.map, 0.5)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 1] = 1  # a crazing box called inclusion
    expected[1, 1] = 1
    assert np.array_equal(report.confusion, expected)
    assert report.class_precision == [None, 0.5, None] and report.class_recall == [0.0, 1.0, None]


def test_missed_and_spurious_boxes_fill_background_column_and_row():
    gts = [record(0, [square(0, 0, 50), square(100, 100, 50)], [A, B]), record(1)]
    preds = [[Detection(square(0, 0, 50), A, 0.9), Detection(square(60, 0, 30), A, 0.8)],
             [Detection(square(10, 10, 40), B, 0.7)]]  # an image with no ground truth
    report = evaluate_detections(gts, preds, CLASSES)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = 1
    expected[1, BG] = 1   # the inclusion box was missed
    expected[BG, 0] = 1   # a spurious crazing detection
    expected[BG, 1] = 1   # a false inclusion on the empty image
    assert np.array_equal(report.confusion, expected)
    assert report.true_positives == [1, 0, 0] and report.false_positives == [1, 1, 0]
    assert report.precision == pytest.approx(1 / 3) and report.recall == pytest.approx(1 / 2)
    # the true crazing box is scored above the spurious one
    assert close(report.ap50, [1.0, 0.0, None])


def test_each_box_is_matched_once_best_iou_first():
    # Two overlapping ground-truth boxes; each prediction overlaps both (IoU >= 0.82).
    gts = [record(0, [[0, 0, 100, 100], [10, 0, 110, 100]], [A, B])]
    preds = [[Detection([8, 0, 108, 100], B, 0.9),    # IoU 0.85 with the A box, 0.96 with the B box
              Detection([0, 0, 100, 100], A, 0.5),    # IoU 1.0 with the A box
              Detection([0, 0, 100, 100], A, 0.4)]]   # a duplicate
    report = evaluate_detections(gts, preds, CLASSES)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = expected[1, 1] = 1
    expected[BG, 0] = 1  # the duplicate
    assert np.array_equal(report.confusion, expected)
    assert report.true_positives == [1, 1, 0] and report.false_positives == [1, 0, 0]
    assert close(report.ap50, [1.0, 1.0, None])


def test_score_threshold_affects_counts_but_not_ap():
    gts = [record(0, [square(0, 0)], [A])]
    report = evaluate_detections(gts, [[Detection(square(0, 0), A, 0.1)]], CLASSES, score_threshold=0.25)
    assert close(report.map, 1.0)
    assert report.precision is None and report.recall == 0.0
    assert report.confusion[0][BG] == 1 and report.confusion[0][0] == 0


def test_iou_threshold_sets_the_operating_point():
    gts = [record(0, [square(0, 0)], [A])]
    preds = [[Detection(square(20, 0), A, 0.9)]]  # IoU 0.667
    assert evaluate_detections(gts, preds, CLASSES, iou_threshold=0.6).recall == 1.0
    assert evaluate_detections(gts, preds, CLASSES, iou_threshold=0.7).recall == 0.0


def test_coco_keeps_100_detections_per_image_and_class():
    gts = [record(0, [square(0, 0, 20)], [A])]
    clutter = [Detection(square(100 + i % 10, 100, 20), A, 0.9) for i in range(100)]
    report = evaluate_detections(gts, [clutter + [Detection(square(0, 0, 20), A, 0.5)]], CLASSES)
    assert report.map50 == 0.0  # the true box is the 101st by score, beyond maxDets
    assert report.recall == 1.0  # the operating point counts every detection above threshold


def test_empty_predictions_give_zero_map():
    gts = [record(0, [square(0, 0)], [A]), record(1, [square(5, 5, 20)], [C])]
    report = evaluate_detections(gts, [[], []], CLASSES)
    assert report.map == 0.0 and report.map50 == 0.0 and close(report.ap, [0.0, None, 0.0])
    assert report.precision is None and report.recall == 0.0
    assert report.confusion[0][BG] == 1 and report.confusion[2][BG] == 1


def test_no_ground_truth_at_all_has_no_map_but_counts_false_positives():
    report = evaluate_detections([record(0), record(1)], [[Detection(square(0, 0), B, 0.9)], []], CLASSES)
    assert report.map is None and report.map50 is None and report.ap == [None, None, None]
    assert report.precision == 0.0 and report.recall is None
    assert report.confusion[BG][1] == 1
    json.dumps(report.to_dict(), allow_nan=False)


def random_case(seed: int):
    """Several images, four classes (the last never in the ground truth), jittered,
    relabelled, missed and spurious detections."""
    rng = random.Random(seed)
    classes = ["a", "b", "c", "d"]
    gts, preds = [], []
    for i in range(12):
        boxes, labels, dets = [], [], []
        for _ in range(rng.randint(0, 5)):
            x, y, w, h = rng.uniform(0, 300), rng.uniform(0, 200), rng.uniform(8, 120), rng.uniform(8, 90)
            boxes.append([x, y, x + w, y + h])
            labels.append(rng.choice(classes[:3]))
            if rng.random() < 0.8:
                jitter = [rng.gauss(0, 0.12 * w), rng.gauss(0, 0.12 * h), rng.gauss(0, 0.12 * w), rng.gauss(0, 0.12 * h)]
                label = labels[-1] if rng.random() < 0.85 else rng.choice(classes)
                dets.append(Detection([v + j for v, j in zip(boxes[-1], jitter)], label, rng.random()))
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, 350), rng.uniform(0, 250)
            dets.append(Detection([x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60)], rng.choice(classes), rng.random()))
        gts.append(Record(f"img{i}.png", 400, 300, boxes, labels))
        preds.append(dets)
    return gts, preds, classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pycocotools_run_directly(tmp_path, seed):
    gts, preds, classes = random_case(seed)
    report = evaluate_detections(gts, preds, classes)

    def xywh(box):
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]

    gt_json = {"images": [{"id": 100 + i, "file_name": r.path.name, "width": r.width, "height": r.height}
                          for i, r in enumerate(gts)],
               "categories": [{"id": 7 + k, "name": name} for k, name in enumerate(classes)],
               "annotations": []}
    results = []
    for i, (r, dets) in enumerate(zip(gts, preds)):
        for box, label in zip(r.boxes, r.labels):
            b = xywh(box)
            gt_json["annotations"].append({"id": len(gt_json["annotations"]) + 1, "image_id": 100 + i,
                                           "category_id": 7 + classes.index(label), "bbox": b,
                                           "area": b[2] * b[3], "iscrowd": 0})
        results += [{"image_id": 100 + i, "category_id": 7 + classes.index(d.label), "bbox": xywh(d.box),
                     "score": d.score} for d in dets]
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "results.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "results.json")), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    assert 0.05 < coco_eval.stats[0] < 0.95  # a case that exercises the metric
    assert report.map == pytest.approx(coco_eval.stats[0], abs=1e-9)
    assert report.map50 == pytest.approx(coco_eval.stats[1], abs=1e-9)
    assert report.coco_stats["AP75"] == pytest.approx(coco_eval.stats[2], abs=1e-9)
    precision = coco_eval.eval["precision"][:, :, :, 0, 2]  # area "all", maxDets 100
    for k in range(3):
        assert report.ap[k] == pytest.approx(precision[:, :, k].mean(), abs=1e-9)
        assert report.pr_curves[k] == pytest.approx(precision[0, :, k].tolist(), abs=1e-12)
    assert report.ap[3] is None and report.pr_curves[3] is None
    counts = np.asarray(report.confusion)
    assert counts[:3].sum(axis=1).tolist() == report.ground_truth_counts[:3]  # each box once
    assert counts[:, :4].sum() == sum(d.score >= 0.25 for dets in preds for d in dets)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_headline_map_equals_the_full_evaluations(seed):
    gts, preds, classes = random_case(seed)
    report = evaluate_detections(gts, preds, classes)
    assert coco_map(gts, preds, classes) == (report.map50, report.map)  # the same numbers to the last bit
    assert coco_map(gts, [[] for _ in gts], classes) == (0.0, 0.0)
    with pytest.raises(DataError, match="nothing to evaluate"):
        coco_map([], [], classes)


def test_to_dict_is_json_with_class_names():
    gts, preds, classes = random_case(0)
    data = json.loads(json.dumps(evaluate_detections(gts, preds, classes).to_dict(), allow_nan=False))
    assert set(data["per_class"]) == set(classes) and data["per_class"]["d"]["ap"] is None
    assert data["confusion"]["labels"] == [*classes, "background"]
    assert len(data["pr_curves"]["recall"]) == 101 and data["pr_curves"]["precision"]["d"] is None


def test_bad_input_is_reported():
    gts = [record(0, [square(0, 0)], ["rust"])]
    with pytest.raises(DataError, match="img0.jpg.*'rust'"):
        evaluate_detections(gts, [[]], CLASSES)
    with pytest.raises(DataError, match="predicted class 'dent'"):
        evaluate_detections([record(0)], [[Detection(square(0, 0), "dent", 0.9)]], CLASSES)
    with pytest.raises(ValueError, match="1 ground-truth records but 2"):
        evaluate_detections([record(0)], [[], []], CLASSES)


def test_plots_are_written(tmp_path):
    gts, preds, classes = random_case(1)
    report = evaluate_detections(gts, preds, classes)
    plot_pr_curves(report, tmp_path / "pr.png")
    plot_detection_confusion(report, tmp_path / "plots" / "confusion.png")
    for path in (tmp_path / "pr.png", tmp_path / "plots" / "confusion.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["confusion.png", "pr.png"]
