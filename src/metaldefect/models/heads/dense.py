"""Dense anchor-free detection head on ViT patch tokens ("dense").

Neck: a simple feature pyramid in the style of ViTDet over the patch maps of several
ViT blocks (:class:`metaldefect.models.heads.pyramid.SimpleFeaturePyramid`).

Predictor (FCOS, Tian et al., 2019, shared across levels): a classification tower
giving per-location class logits (sigmoid focal loss), and a regression tower giving
the distances ``(left, top, right, bottom)`` from the location to the box sides in
units of the level's stride (GIoU loss) and a quality logit trained to predict the IoU
of the location's predicted box with its target box (an IoU-aware score, used in place
of FCOS's centerness because the nearest-point fallback for thin boxes, see
:mod:`metaldefect.data.dense_targets`, has no meaningful centerness). A detection's
score is ``sqrt(class probability * quality)``.

With ``box_bins=n`` each distance is not regressed directly but predicted as a
distribution over the whole strides ``0 .. n-1``; the distance is its expectation, and
a distribution focal loss (GFL, Li et al., 2020; YOLOv8's DFL) pulls the probability
onto the two whole strides either side of the target. Blurred defect borders make a
side's position uncertain, and a distribution can say so where one number cannot.

With ``score="varifocal"`` there is no quality branch: the class logits themselves are
trained towards the IoU reached at positive locations and towards 0 elsewhere with the
varifocal loss (VarifocalNet, Zhang et al., 2021), so one number ranks detections by
both class and box quality and is trained at every location, not only positive ones.
``score="task_aligned"`` goes further and lets the predictions choose the positives
(YOLOv8's task-aligned assignment, :mod:`metaldefect.models.heads.task_aligned`).

With ``detail_width=w`` a small CNN (:mod:`metaldefect.models.heads.detail_stem`) learns
features from the image itself, trained with the head, and adds its stride-8 and
stride-16 maps to the pyramid levels of scale 2 and 1: the frozen ViT's 12.5 px patches
are coarser than NEU-DET's thinnest defects.

Shapes: ``B`` images, ``L`` locations over all levels (finest first, row-major),
``K`` classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from metaldefect.data.dense_targets import dense_locations, encode_dense_targets
from metaldefect.data.records import Detection
from metaldefect.errors import ConfigError
from metaldefect.models.heads import register_head
from metaldefect.models.heads.detail_stem import DetailStem
from metaldefect.models.heads.pyramid import SimpleFeaturePyramid
from metaldefect.models.heads.task_aligned import task_aligned_targets

SCORES = ("quality", "varifocal", "task_aligned")


class ContiguousGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed on a contiguous copy of a channels-last input (same weights, same values).

    Training runs the head channels-last (:mod:`metaldefect.engine.engine`), which suits the convolutions,
    but torch's CPU GroupNorm takes a slow path for channels-last bfloat16: 12.3 ms forward and backward on
    ``[32, 128, 16, 16]`` against 1.4 ms contiguous. With this, the engine's training step of the built-in
    heads was 1.08-1.31 times faster (median 1.12, five runs of benchmarks/training_step.py; docs/benchmarks.md,
    session 15). The two kernels round bf16 differently; on a contiguous input it is plain GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1),
                   ContiguousGroupNorm(min(32, channels // 4), channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@register_head("dense")
class DenseHead(nn.Module):
    """FCOS-style dense detector over a ViTDet-style simple feature pyramid.

    Args:
        in_dims: ``{"pooled": D, "map": D, "layers": [D_l, ...], "stride": s}``; the head
            reads ``features["layers"]`` (or ``features["map"]`` when no layers are given).
        num_classes: ``K``.
        channels: width of the neck and the towers.
        num_convs: 3x3 convolutions in each tower.
        scales: pyramid levels relative to the ViT map, finest first; ViTDet uses ``[4, 2, 1, 0.5]``,
            NEU-DET's 35-200 px boxes in 200 px images need no level finer than the map.
        size_ranges: per level ``[low, high]`` of a location's largest box-side distance, as a
            fraction of the image side; None for FCOS's ``[4, 8)`` strides per level.
        center_radius: positives lie within this many strides of a box centre.
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        loss_weights: weights of ``loss_cls``, ``loss_box`` (GIoU), ``loss_quality`` (BCE) and
            ``loss_dfl`` (distribution focal loss, with ``box_bins`` only; 0.25 as in GFL).
        nms_iou: IoU above which ``batched_nms`` drops the lower-scored box of a class.
        score: ``"quality"`` (focal class loss plus a quality branch), ``"varifocal"``
            (class logits trained towards the IoU, no quality branch) or ``"task_aligned"``
            (positives chosen by the predictions, see :mod:`.task_aligned`; no quality branch).
        top_k: positives per box with ``score="task_aligned"``.
        box_bins: 0 to regress each side's distance directly; ``n >= 2`` to predict it as a
            distribution over ``0 .. n-1`` strides (GFL). FCOS's size ranges keep targets
            under 8 strides, so 16 bins (YOLOv8's count) leave room.
        dropout: channel dropout on the concatenated ViT layers before the neck's 1x1 projection.
        detail_width: 0 for none, else the first width of a :class:`.DetailStem` learnt on the image,
            whose stride-8 and stride-16 maps are added to the levels of scale 2 and 1 (the head then
            reads ``features["image"]``, see ``needs_image``).
        pre_nms_top_k, max_detections: candidates kept per image before and after NMS.
    """

    task = "detect"

    def __init__(self, in_dims: dict, num_classes: int, channels: int = 128, num_convs: int = 2,
                 scales: list[float] = (1.0, 0.5, 0.25), size_ranges: list[list[float]] | None = None,
                 center_radius: float = 1.5, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 loss_weights: dict[str, float] | None = None, nms_iou: float = 0.6,
                 pre_nms_top_k: int = 1000, max_detections: int = 100, score: str = "quality",
                 top_k: int = 10, box_bins: int = 0, dropout: float = 0.0, detail_width: int = 0):
        super().__init__()
        if score not in SCORES:
            raise ConfigError(f"dense head score must be one of {', '.join(SCORES)}, got {score!r}")
        if box_bins < 0 or box_bins == 1:
            raise ConfigError(f"dense head box_bins must be 0 (direct distances) or at least 2, got {box_bins}")
        self.score, self.top_k, self.box_bins = score, top_k, box_bins
        layer_dims = list(in_dims.get("layers") or [in_dims["map"]])
        self.num_classes = num_classes
        self.scales = [float(s) for s in scales]
        self.size_ranges = None if size_ranges is None else [tuple(r) for r in size_ranges]
        if self.size_ranges is not None and len(self.size_ranges) != len(self.scales):
            raise ConfigError(f"{len(self.size_ranges)} size ranges for {len(self.scales)} pyramid scales")
        self.center_radius = center_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_weights = {"loss_cls": 1.0, "loss_box": 2.0, "loss_quality": 1.0, "loss_dfl": 0.25,
                             **(loss_weights or {})}
        self.nms_iou, self.pre_nms_top_k, self.max_detections = nms_iou, pre_nms_top_k, max_detections

        if detail_width < 0 or (detail_width and not {2.0, 1.0} & set(self.scales)):
            raise ConfigError(f"dense head detail_width must be 0 or positive, with a pyramid scale of 2 or 1; "
                              f"got {detail_width} with scales {self.scales}")
        self.detail = DetailStem(detail_width) if detail_width else None
        self.needs_image = self.detail is not None  # DefectModel and the feature loader add features["image"]
        self.neck = SimpleFeaturePyramid(layer_dims, channels, self.scales, dropout,
                                         self.detail.dims if self.detail is not None else None)
        self.cls_tower = _tower(channels, num_convs)
        self.box_tower = _tower(channels, num_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_ltrb = nn.Conv2d(channels, 4 * max(box_bins, 1), 3, padding=1)
        self.quality = nn.Conv2d(channels, 1, 3, padding=1) if score == "quality" else None
        # FCOS's learnt per-level scale of the distances; a distribution's range is fixed by its bins.
        self.level_scales = None if box_bins else nn.Parameter(torch.ones(len(self.scales)))
        self.register_buffer("bin_values", torch.arange(float(box_bins)), persistent=False)
        self._reset_predictor()
        self._locations: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _reset_predictor(self) -> None:
        for module in [*self.cls_tower, *self.box_tower, self.cls_logits, self.box_ltrb, self.quality]:
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        # FCOS's prior: every location starts at probability 0.01 per class, so the many
        # background locations do not swamp the focal loss in the first steps.
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))

    def _level_locations(self, level_sizes: list[tuple[int, int]], device: torch.device):
        key = (tuple(level_sizes), str(device))
        if key not in self._locations:
            self._locations[key] = tuple(t.to(device) for t in dense_locations(level_sizes, self.size_ranges))
        return self._locations[key]

    def forward(self, features: dict) -> dict[str, torch.Tensor]:
        """Per-location predictions.

        Args:
            features: ``{"layers": [[B, D_l, h, w], ...], "map": [B, D, h, w], ...}``, and
                ``"image"`` ``[B, 1 or 3, S, S]`` in [0, 1] when ``needs_image``.

        Returns:
            ``"cls_logits"`` ``[B, L, K]``; ``"box_ltrb"`` ``[B, L, 4]`` non-negative distances
            in strides; ``"quality_logits"`` ``[B, L]`` (``score="quality"`` only);
            ``"box_bin_logits"`` ``[B, L, 4, n]`` (``box_bins=n`` only); and the
            locations, the same for every image: ``"points"`` ``[B, L, 2]`` normalised ``(x, y)``,
            ``"strides"`` ``[B, L]`` normalised, ``"ranges"`` ``[B, L, 2]`` the levels' size ranges.
        """
        layers = features.get("layers") or [features["map"]]
        detail = None
        if self.detail is not None:
            if "image" not in features:
                raise ValueError("the dense head's detail stem needs the image: features['image'] is missing")
            detail = self.detail(features["image"], grid=layers[0].shape[-1])
        levels = self.neck(list(layers), detail)
        cls_logits, box_ltrb, bin_logits, quality = [], [], [], []
        for index, level in enumerate(levels):
            cls_features = self.cls_tower(level)
            box_features = self.box_tower(level)
            cls_logits.append(self.cls_logits(cls_features).flatten(2))
            box = self.box_ltrb(box_features).flatten(2)                         # [B, 4 * max(n, 1), hw]
            if self.box_bins:
                bins = box.unflatten(1, (4, self.box_bins))                      # [B, 4, n, hw]
                bin_logits.append(bins)
                box_ltrb.append((bins.softmax(dim=2) * self.bin_values[:, None]).sum(dim=2))
            else:
                # softplus rather than FCOS's relu: distances stay positive and never lose their gradient.
                box_ltrb.append(F.softplus(self.level_scales[index] * box))
            if self.quality is not None:
                quality.append(self.quality(box_features).flatten(2))
        batch = levels[0].shape[0]
        points, strides, ranges = self._level_locations([tuple(x.shape[-2:]) for x in levels], levels[0].device)
        outputs = {"cls_logits": torch.cat(cls_logits, dim=2).transpose(1, 2),
                   "box_ltrb": torch.cat(box_ltrb, dim=2).transpose(1, 2),
                   "points": points.expand(batch, -1, -1), "strides": strides.expand(batch, -1),
                   "ranges": ranges.expand(batch, -1, -1)}
        if quality:
            outputs["quality_logits"] = torch.cat(quality, dim=2)[:, 0]
        if bin_logits:
            outputs["box_bin_logits"] = torch.cat(bin_logits, dim=3).permute(0, 3, 1, 2)
        return outputs

    def encode_targets(self, outputs: dict, targets: list[dict]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Targets for every location: classes ``[B, L]`` (-1 background), ltrb ``[B, L, 4]``, and
        with ``score="task_aligned"`` the soft class targets ``[B, L]`` (None otherwise)."""
        points, strides = outputs["points"], outputs["strides"]
        if self.score == "task_aligned":
            return task_aligned_targets(
                outputs["cls_logits"].detach().sigmoid(),
                _absolute_boxes(outputs["box_ltrb"].detach(), points, strides), points[0], strides[0], targets,
                top_k=self.top_k)
        classes, ltrb = encode_dense_targets(targets, points[0], strides[0], outputs["ranges"][0],
                                             self.center_radius)
        return classes, ltrb, None

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Class loss, GIoU on positive boxes and, with ``score="quality"``, BCE of quality against the IoU.

        By ``score``: ``"quality"`` takes FCOS's positives and sigmoid focal loss against one-hot
        classes; ``"varifocal"`` the same positives and varifocal loss against the IoU each one's
        box reaches; ``"task_aligned"`` the positives of :func:`task_aligned_targets` and binary
        cross-entropy against their soft targets, with each box loss weighted by its target
        (YOLOv8). Losses are normalised by the number of positives (the sum of the soft targets).
        ``targets``: per image ``{"boxes": [N, 4] normalised xyxy, "labels": [N]}``.
        """
        classes, ltrb, soft = self.encode_targets(outputs, targets)
        positive = classes >= 0                                                  # [B, L]
        predicted = _ltrb_to_relative_boxes(outputs["box_ltrb"][positive])       # [P, 4]
        target = _ltrb_to_relative_boxes(ltrb[positive])                          # [P, 4]
        iou = _paired_iou(predicted.detach(), target)                             # [P]
        cls_target = torch.zeros_like(outputs["cls_logits"])                      # [B, L, K]
        logits = outputs["cls_logits"]
        if soft is not None:
            cls_target[positive, classes[positive]] = soft[positive]
            normaliser, box_weight = max(float(soft.sum()), 1.0), soft[positive]
            loss_cls = F.binary_cross_entropy_with_logits(logits, cls_target, reduction="sum")
        elif self.score == "varifocal":
            cls_target[positive, classes[positive]] = iou
            normaliser, box_weight = max(int(positive.sum()), 1), 1.0
            loss_cls = _varifocal_loss(logits, cls_target)
        else:
            cls_target[positive, classes[positive]] = 1.0
            normaliser, box_weight = max(int(positive.sum()), 1), 1.0
            loss_cls = sigmoid_focal_loss(logits, cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                          reduction="sum")
        parts = {"loss_cls": loss_cls / normaliser}
        if positive.any():
            giou = generalized_box_iou_loss(predicted, target, reduction="none")
            parts["loss_box"] = (giou * box_weight).sum() / normaliser
        else:
            parts["loss_box"] = outputs["box_ltrb"].sum() * 0.0
        if self.box_bins:
            dfl = _distribution_focal_loss(outputs["box_bin_logits"][positive], ltrb[positive])    # [P]
            parts["loss_dfl"] = (dfl * box_weight).sum() / normaliser
        if self.score == "quality":
            parts["loss_quality"] = (F.binary_cross_entropy_with_logits(outputs["quality_logits"][positive], iou)
                                     if positive.any() else outputs["quality_logits"].sum() * 0.0)
        return {"loss": sum(self.loss_weights[k] * v for k, v in parts.items()), **parts}

    @torch.no_grad()
    def metrics(self, outputs: dict, targets: list[dict]) -> dict[str, tuple[float, float]]:
        """At positive locations: class accuracy (``pos_acc``) and mean IoU of the box (``pos_iou``).

        With ``score="task_aligned"`` each positive counts by its soft target, as in the loss:
        most of a box's top-k points have targets near 0 once its best point is found.
        """
        classes, ltrb, soft = self.encode_targets(outputs, targets)
        positive = classes >= 0
        weight = soft[positive] if soft is not None else torch.ones(int(positive.sum()), device=positive.device)
        correct = outputs["cls_logits"][positive].argmax(dim=1) == classes[positive]
        iou = _paired_iou(_ltrb_to_relative_boxes(outputs["box_ltrb"][positive]),
                          _ltrb_to_relative_boxes(ltrb[positive]))
        count = float(weight.sum())
        return {"pos_acc": (float((weight * correct).sum()), count), "pos_iou": (float((weight * iou).sum()), count)}

    @torch.no_grad()
    def decode(self, outputs: dict, image_sizes: list[tuple[int, int]], classes: list[str],
               score_threshold: float = 0.0) -> list[list[Detection]]:
        """Top-scored boxes per image after class-wise NMS, in absolute pixels of each original image.

        Args:
            outputs: :meth:`forward`'s dict for ``B`` images.
            image_sizes: ``(width, height)`` of each original image, ``B`` entries.
            classes: the class vocabulary, ``K`` names.
            score_threshold: detections scored below this are dropped.
        """
        scores = outputs["cls_logits"].sigmoid()                                  # [B, L, K]
        if self.score == "quality":
            scores = torch.sqrt(scores * outputs["quality_logits"].sigmoid()[..., None])
        boxes = _absolute_boxes(outputs["box_ltrb"], outputs["points"], outputs["strides"]).clamp(0.0, 1.0)
        detections = []
        for image_scores, image_boxes, (width, height) in zip(scores, boxes, image_sizes):
            flat = image_scores.flatten()                                         # [L * K]
            top = flat.topk(min(self.pre_nms_top_k, flat.numel()))
            keep = top.values >= score_threshold
            values, index = top.values[keep], top.indices[keep]
            location, label = index // self.num_classes, index % self.num_classes
            candidates = image_boxes[location] * image_boxes.new_tensor([width, height, width, height])
            kept = batched_nms(candidates, values, label, self.nms_iou)[: self.max_detections]
            # One tolist() per tensor: indexing tensors box by box cost a third of a val pass's decoding.
            detections.append([Detection(box=box, label=classes[k], score=score) for box, k, score in
                               zip(candidates[kept].tolist(), label[kept].tolist(), values[kept].tolist())])
        return detections


def _varifocal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75,
                    gamma: float = 2.0) -> torch.Tensor:
    """Summed varifocal loss (Zhang et al., 2021) of logits against soft targets, any equal shapes.

    Positives (target > 0) are weighted by their target IoU, so well-located boxes count
    most; negatives are down-weighted like focal loss by ``alpha * p^gamma``. Written
    here because torchvision has only the plain sigmoid focal loss.
    """
    probability = logits.sigmoid()
    weight = torch.where(target > 0, target, alpha * probability.detach().pow(gamma))
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()


def _distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GFL's distribution focal loss, ``[P]``: logits ``[P, 4, n]`` over whole strides, target distances ``[P, 4]``.

    A target ``t`` between strides ``i`` and ``i + 1`` is the two-point distribution with
    weights ``i + 1 - t`` and ``t - i``; the loss is its cross-entropy with the prediction,
    averaged over the four sides. Targets outside ``[0, n - 1]`` (the nearest-point fallback
    gives slightly negative ones) are clamped into it. Written here because neither torch
    nor torchvision ships it.
    """
    target = target.clamp(0.0, logits.shape[-1] - 1 - 1e-4)
    left = target.floor().long()
    right_weight = target - left
    log_probs = logits.log_softmax(dim=-1)
    left_log = log_probs.gather(-1, left[..., None])[..., 0]
    right_log = log_probs.gather(-1, left[..., None] + 1)[..., 0]
    return -(left_log * (1 - right_weight) + right_log * right_weight).mean(dim=-1)


def _ltrb_to_relative_boxes(ltrb: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` distances to the sides -> ``xyxy`` boxes around a location at the origin."""
    return torch.cat([-ltrb[..., :2], ltrb[..., 2:]], dim=-1)


def _absolute_boxes(ltrb: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """``[B, L, 4]`` distances in strides, ``[B, L, 2]`` points, ``[B, L]`` strides -> normalised xyxy."""
    return points.repeat(1, 1, 2) + _ltrb_to_relative_boxes(ltrb) * strides[..., None]


def _paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]``, ``[P]``; torchvision's box_iou would build all ``P x P`` pairs."""
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return intersection / (area_a + area_b - intersection).clamp(min=1e-12)
