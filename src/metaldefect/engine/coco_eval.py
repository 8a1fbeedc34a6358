"""Detection metrics the field reports, computed by pycocotools.

``evaluate_detections`` turns ground-truth records and predicted detections into COCO
dicts in memory and runs pycocotools' ``COCOeval`` (bbox). From it come mAP@0.5,
mAP@0.5:0.95, per-class AP and the PR curves. Precision, recall and the detection
confusion matrix at one score threshold are counted here (see ``_count_matches`` and
``_confusion``), because COCOeval integrates over all scores and exposes no
operating point.

Conventions:
- Images are identified by position: the i-th record and the i-th prediction list
  describe the same image; COCO image ids are ``i + 1`` (COCO ids start at 1).
- COCOeval's defaults are kept: IoU thresholds 0.50:0.05:0.95, 101 recall points,
  area range "all" and at most 100 detections per image and class (the highest scored;
  ``maxDets=100``), as in every published COCO-style number.
- A class with no ground-truth box has no AP (``None``) and, as in COCO, is left out of
  the means; its predictions still count as false positives in precision and in the
  confusion matrix. Every other undefined value (precision with no prediction, recall
  with no ground truth, mAP with no ground truth at all) is ``None`` too, so
  ``to_dict()`` is valid JSON.
- "At the score threshold" means ``score >= score_threshold``; a match needs
  ``IoU >= iou_threshold`` (COCO's rule).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from metaldefect.data.records import Detection, Record
from metaldefect.errors import ConfigError, DataError

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
MAX_DETECTIONS = 100  # COCOeval's default maxDets[-1], per image and class


@dataclass
class DetectionReport:
    """Detection metrics of one evaluation; per-class lists follow ``classes``' order.

    Attributes:
        map50, map: mAP@0.5 and mAP@0.5:0.95 (COCOeval ``stats[1]`` and ``stats[0]``).
        coco_stats: the 12 numbers of COCOeval's summary by name (``COCO_STAT_NAMES``).
        ap50, ap: per-class AP@0.5 and AP@0.5:0.95, ``[C]``, ``None`` without ground truth.
        precision, recall: pooled over all classes at the score and IoU thresholds.
        class_precision, class_recall, ground_truth_counts, true_positives,
        false_positives: per class at the same thresholds, ``[C]``.
        recall_grid: COCO's 101 recall points 0.00, 0.01, ... 1.00.
        pr_curves: per class, the interpolated precision at each recall point at IoU 0.5,
            ``[C][101]``, ``None`` without ground truth.
        confusion: ``[C + 1][C + 1]`` counts; rows are true classes, columns predicted
            classes, the last row and column "background": an unmatched prediction
            counts in the background row, a missed ground-truth box in the background column.
    """

    classes: list[str]
    num_images: int
    score_threshold: float
    iou_threshold: float
    map50: float | None
    map: float | None
    precision: float | None
    recall: float | None
    coco_stats: dict[str, float | None]
    ap50: list[float | None]
    ap: list[float | None]
    class_precision: list[float | None]
    class_recall: list[float | None]
    ground_truth_counts: list[int]
    true_positives: list[int]
    false_positives: list[int]
    recall_grid: list[float]
    pr_curves: list[list[float] | None]
    confusion: list[list[int]]

    def to_dict(self) -> dict:
        """JSON-ready values (no NaN): the fields, with per-class values keyed by class name."""
        per_class = {
            name: {"ap50": self.ap50[k], "ap": self.ap[k],
                   "precision": self.class_precision[k], "recall": self.class_recall[k],
                   "ground_truth": self.ground_truth_counts[k],
                   "true_positives": self.true_positives[k],
                   "false_positives": self.false_positives[k]}
            for k, name in enumerate(self.classes)}
        fields = asdict(self)
        for key in ("ap50", "ap", "class_precision", "class_recall", "ground_truth_counts",
                    "true_positives", "false_positives", "recall_grid", "pr_curves", "confusion"):
            del fields[key]
        return {**fields, "per_class": per_class,
                "pr_curves": {"iou": 0.5, "recall": self.recall_grid,
                              "precision": dict(zip(self.classes, self.pr_curves))},
                "confusion": {"labels": [*self.classes, "background"], "matrix": self.confusion}}

    def summary(self) -> str:
        """A plain-text table of the headline and per-class numbers."""
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        width = max(len(name) for name in [*self.classes, "class"])
        lines = [f"{self.num_images} images; precision/recall at score >= {self.score_threshold:g}, "
                 f"IoU >= {self.iou_threshold:g}",
                 f"{'class':<{width}}  {'AP50':>5}  {'AP':>5}  {'P':>5}  {'R':>5}  {'boxes':>5}",
                 f"{'all':<{width}}  {fmt(self.map50):>5}  {fmt(self.map):>5}  {fmt(self.precision):>5}  "
                 f"{fmt(self.recall):>5}  {sum(self.ground_truth_counts):>5}"]
        for k, name in enumerate(self.classes):
            lines.append(f"{name:<{width}}  {fmt(self.ap50[k]):>5}  {fmt(self.ap[k]):>5}  "
                         f"{fmt(self.class_precision[k]):>5}  {fmt(self.class_recall[k]):>5}  "
                         f"{self.ground_truth_counts[k]:>5}")
        return "\n".join(lines)


def evaluate_detections(ground_truth: list[Record], predictions: list[list[Detection]],
                        classes: list[str], score_threshold: float = 0.25,
                        iou_threshold: float = 0.5) -> DetectionReport:
    """COCO mAP, per-class AP, PR curves, and precision, recall and confusion at one threshold.

    Args:
        ground_truth: one record per image (absolute pixel ``xyxy`` boxes, class names).
        predictions: one list of detections per image, in the same order.
        classes: the class vocabulary; every label must be one of these.
        score_threshold: detections scored at least this count for precision, recall and
            the confusion matrix (AP uses every detection).
        iou_threshold: the IoU a match needs for precision, recall and the confusion matrix.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise ConfigError(f"score threshold must be in [0, 1], got {score_threshold}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ConfigError(f"IoU threshold must be in (0, 1], got {iou_threshold}")
    gt_boxes, gt_labels, dt_boxes, dt_labels, dt_scores = _as_tensors(ground_truth, predictions, classes)
    coco_eval = _run_cocoeval(ground_truth, gt_boxes, gt_labels, dt_boxes, dt_labels, dt_scores,
                              len(classes))
    params = coco_eval.params
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M maxDets]
    precision = coco_eval.eval["precision"][:, :, :, params.areaRngLbl.index("all"),
                                            params.maxDets.index(MAX_DETECTIONS)]
    iou50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
    ap = [_mean_valid(precision[:, :, k]) for k in range(len(classes))]
    ap50 = [_mean_valid(precision[iou50, :, k]) for k in range(len(classes))]
    curves = [None if ap50[k] is None else precision[iou50, :, k].tolist() for k in range(len(classes))]
    stats = {name: _valid(value) for name, value in zip(COCO_STAT_NAMES, coco_eval.stats)}

    kept = [scores >= score_threshold for scores in dt_scores]
    dt_boxes = [boxes[keep] for boxes, keep in zip(dt_boxes, kept)]
    dt_labels = [labels[keep] for labels, keep in zip(dt_labels, kept)]
    dt_scores = [scores[keep] for scores, keep in zip(dt_scores, kept)]
    tp, fp, counts = _count_matches(gt_boxes, gt_labels, dt_boxes, dt_labels, dt_scores,
                                    len(classes), iou_threshold)
    confusion = _confusion(gt_boxes, gt_labels, dt_boxes, dt_labels, len(classes), iou_threshold)
    return DetectionReport(
        classes=list(classes), num_images=len(ground_truth),
        score_threshold=float(score_threshold), iou_threshold=float(iou_threshold),
        map50=stats["AP50"], map=stats["AP"],
        precision=_ratio(tp.sum(), tp.sum() + fp.sum()), recall=_ratio(tp.sum(), counts.sum()),
        coco_stats=stats, ap50=ap50, ap=ap,
        class_precision=[_ratio(t, t + f) for t, f in zip(tp, fp)],
        class_recall=[_ratio(t, n) for t, n in zip(tp, counts)],
        ground_truth_counts=counts.tolist(), true_positives=tp.tolist(), false_positives=fp.tolist(),
        recall_grid=params.recThrs.tolist(), pr_curves=curves, confusion=confusion.tolist())


def coco_map(ground_truth: list[Record], predictions: list[list[Detection]],
             classes: list[str]) -> tuple[float | None, float | None]:
    """COCO ``(mAP@0.5, mAP@0.5:0.95)`` alone, the same numbers as :func:`evaluate_detections`' ``map50`` and
    ``map``, faster (0.65 s against 2.16 s on NEU-DET's 288 val images, medians of five; docs/benchmarks.md,
    session 16): COCOeval matches over the "all" area range only, not also small, medium and large, and nothing
    else is computed. For the val pass of every training epoch (arguments as there)."""
    tensors = _as_tensors(ground_truth, predictions, classes)
    coco_eval = _run_cocoeval(ground_truth, *tensors, len(classes), headline_only=True)
    # precision: [T iou thresholds, R recall points, K classes, 1 area range, M maxDets]
    precision = coco_eval.eval["precision"][..., 0, coco_eval.params.maxDets.index(MAX_DETECTIONS)]
    iou50 = int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.5)))
    return _mean_valid(precision[iou50]), _mean_valid(precision)


def _as_tensors(ground_truth: list[Record], predictions: list[list[Detection]], classes: list[str]):
    """Per image: ground-truth boxes ``[N, 4]`` and class indices ``[N]``, detected boxes ``[D, 4]``,
    class indices ``[D]`` and scores ``[D]``; five lists. Checks the arguments as the callers document."""
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth records but {len(predictions)} prediction lists")
    if not ground_truth:
        raise DataError("nothing to evaluate: no images")
    if not classes or len(set(classes)) != len(classes):
        raise ConfigError(f"classes must be a non-empty list of distinct names, got {classes}")
    index = {name: k for k, name in enumerate(classes)}
    gt_boxes, gt_labels, dt_boxes, dt_labels, dt_scores = [], [], [], [], []
    for record, detections in zip(ground_truth, predictions):
        gt_boxes.append(_box_tensor(record.boxes))
        gt_labels.append(_label_tensor(record.labels, index, record, "ground-truth"))
        dt_boxes.append(_box_tensor([d.box for d in detections]))
        dt_labels.append(_label_tensor([d.label for d in detections], index, record, "predicted"))
        dt_scores.append(torch.tensor([float(d.score) for d in detections], dtype=torch.float64))
    return gt_boxes, gt_labels, dt_boxes, dt_labels, dt_scores


def _box_tensor(boxes: list[list[float]]) -> torch.Tensor:
    """``[N, 4]`` float64 ``xyxy`` (float64 so COCO's and our IoUs agree to the last bit)."""
    return torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)


def _label_tensor(labels: list[str], index: dict[str, int], record: Record, kind: str) -> torch.Tensor:
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise DataError(f"{record.path}: {kind} class {unknown[0]!r} is not one of the evaluated "
                        f"classes {list(index)}")
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


def _run_cocoeval(records, gt_boxes, gt_labels, dt_boxes, dt_labels, dt_scores, num_classes,
                  headline_only: bool = False) -> COCOeval:
    """Build both COCO datasets in memory and run the bbox evaluation, its prints swallowed.

    ``headline_only``: match over the "all" area range alone and skip the summary (its stats then stay unset).
    """
    images = [{"id": i + 1, "width": r.width, "height": r.height, "file_name": str(r.path)}
              for i, r in enumerate(records)]
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    gt_annotations, dt_annotations = [], []
    for i in range(len(records)):
        for box, label in zip(gt_boxes[i].tolist(), gt_labels[i].tolist()):
            gt_annotations.append({**_coco_box(box), "image_id": i + 1, "category_id": label + 1,
                                   "iscrowd": 0, "id": len(gt_annotations) + 1})
        for box, label, score in zip(dt_boxes[i].tolist(), dt_labels[i].tolist(), dt_scores[i].tolist()):
            dt_annotations.append({**_coco_box(box), "image_id": i + 1, "category_id": label + 1,
                                   "score": score, "iscrowd": 0, "id": len(dt_annotations) + 1})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco(images, categories, gt_annotations)
        # The detections' dataset is built like the ground truth's rather than by
        # COCO.loadRes, which fails on an empty list; for boxes it would add the same
        # fields (area = w * h, iscrowd 0, ids from 1).
        coco_dt = _coco(images, categories, dt_annotations)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if headline_only:
            params = coco_eval.params
            params.areaRng, params.areaRngLbl = [params.areaRng[params.areaRngLbl.index("all")]], ["all"]
        coco_eval.evaluate()
        coco_eval.accumulate()
        if not headline_only:
            coco_eval.summarize()
    return coco_eval


def _coco_box(box: list[float]) -> dict:
    x1, y1, x2, y2 = box
    return {"bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco


def _count_matches(gt_boxes, gt_labels, dt_boxes, dt_labels, dt_scores, num_classes, iou_threshold):
    """True and false positives per class at one operating point, matched as COCO matches.

    COCOeval exposes precision only along its recall grid, never at a fixed score
    threshold, so this small matching is written here: per image and class, detections
    in descending score order each take the unmatched ground-truth box of highest IoU,
    if that IoU reaches ``iou_threshold``.

    Returns:
        true positives, false positives and ground-truth counts, each ``[C]`` int64 numpy.
    """
    tp = np.zeros(num_classes, dtype=np.int64)
    fp = np.zeros(num_classes, dtype=np.int64)
    counts = np.zeros(num_classes, dtype=np.int64)
    for g_boxes, g_labels, d_boxes, d_labels, d_scores in zip(gt_boxes, gt_labels, dt_boxes,
                                                               dt_labels, dt_scores):
        counts += np.bincount(g_labels.numpy(), minlength=num_classes)
        for k in d_labels.unique().tolist():
            gt_k = g_boxes[g_labels == k]
            dt_mask = d_labels == k
            order = torch.argsort(d_scores[dt_mask], descending=True, stable=True)
            ious = box_iou(d_boxes[dt_mask][order], gt_k)  # [detections of k, ground truth of k]
            taken = torch.zeros(len(gt_k), dtype=torch.bool)
            for row in ious:
                row = row.masked_fill(taken, -1.0)
                if len(row) and row.max() >= iou_threshold:
                    taken[row.argmax()] = True
                    tp[k] += 1
                else:
                    fp[k] += 1
    return tp, fp, counts


def _confusion(gt_boxes, gt_labels, dt_boxes, dt_labels, num_classes, iou_threshold) -> np.ndarray:
    """``[C + 1, C + 1]`` counts, rows true and columns predicted class, last index background.

    Matching ignores classes (so a box found with the wrong class shows off the
    diagonal): pairs at ``IoU >= iou_threshold`` are taken greedily, highest IoU first,
    each box at most once.
    """
    background = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for g_boxes, g_labels, d_boxes, d_labels in zip(gt_boxes, gt_labels, dt_boxes, dt_labels):
        ious = box_iou(g_boxes, d_boxes)  # [ground truth, detections]
        gt_matched = torch.zeros(len(g_boxes), dtype=torch.bool)
        dt_matched = torch.zeros(len(d_boxes), dtype=torch.bool)
        g_index, d_index = torch.nonzero(ious >= iou_threshold, as_tuple=True)
        order = torch.argsort(ious[g_index, d_index], descending=True, stable=True)
        for g, d in zip(g_index[order].tolist(), d_index[order].tolist()):
            if not gt_matched[g] and not dt_matched[d]:
                gt_matched[g] = dt_matched[d] = True
                matrix[int(g_labels[g]), int(d_labels[d])] += 1
        np.add.at(matrix, (g_labels[~gt_matched].numpy(), background), 1)
        np.add.at(matrix, (background, d_labels[~dt_matched].numpy()), 1)
    return matrix


def _mean_valid(precision: np.ndarray) -> float | None:
    """Mean of COCO precision entries, skipping its -1 marks for "no ground truth"."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def _valid(value: float) -> float | None:
    return None if value < 0 else float(value)


def _ratio(numerator: int, denominator: int) -> float | None:
    return float(numerator) / float(denominator) if denominator else None
