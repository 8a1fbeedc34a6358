"""Anchor-free dense targets (FCOS style) for a pyramid of square feature maps.

Every location of every pyramid level is a point in normalised image coordinates
(the network input is square and the resize uniform per axis, so the same numbers hold
for the original image). A point is positive for a box when it lies in the box's
central region (``center_radius`` strides around the box centre, clipped to the box)
and the box's size suits the point's level: the largest of the point's distances to
the four box sides lies in the level's size range. A point claimed by several boxes
takes the smallest (FCOS). Its targets are the box's class and the distances
``(left, top, right, bottom)`` from the point to the box sides in units of the
level's stride.

NEU-DET holds thin defects (scratches, inclusions 11-13 px wide in a 200 px image)
that can fall between the point centres of a coarse level; such a box would never
be learned. A box left without any positive point therefore takes the point
nearest its centre on the level that suits its size (its distances may then be
slightly negative: the point lies just outside the box; box losses compare the
decoded boxes, which stay valid).

Locations are ordered level by level, row-major inside a level, as a head flattens them.
"""
from __future__ import annotations

import math

import torch

from metaldefect.errors import ConfigError

BACKGROUND = -1


def default_size_ranges(strides: list[float]) -> list[tuple[float, float]]:
    """FCOS's ranges scaled to the strides: level ``l`` takes distances in ``[4 s_l, 8 s_l)``.

    The first level starts at 0 and the last ends at infinity, so every box has a level.

    Args:
        strides: normalised stride of each level (``1 / map width``), finest first.
    """
    ranges = [(4.0 * s, 8.0 * s) for s in strides]
    ranges[0] = (0.0, ranges[0][1])
    ranges[-1] = (ranges[-1][0], math.inf)
    return ranges


def dense_locations(level_sizes: list[tuple[int, int]],
                    size_ranges: list[tuple[float, float]] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point centres, strides and size ranges of every location of a pyramid.

    Args:
        level_sizes: ``(height, width)`` of each level's map, finest first; maps are square.
        size_ranges: ``(low, high)`` per level in normalised units (fractions of the image
            side), or None for :func:`default_size_ranges`.

    Returns:
        points ``[L, 2]`` normalised ``(x, y)`` centres, strides ``[L]`` normalised,
        ranges ``[L, 2]``; ``L`` is the sum of ``height * width`` over levels.
    """
    for height, width in level_sizes:
        if height != width:
            raise ConfigError(f"dense targets need square maps, got {height}x{width}")
    strides = [1.0 / width for _, width in level_sizes]
    if size_ranges is None:
        size_ranges = default_size_ranges(strides)
    if len(size_ranges) != len(level_sizes):
        raise ConfigError(f"{len(size_ranges)} size ranges for {len(level_sizes)} pyramid levels")
    points, level_strides, ranges = [], [], []
    for (height, width), stride, size_range in zip(level_sizes, strides, size_ranges):
        ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height,
                                (torch.arange(width) + 0.5) / width, indexing="ij")
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1))
        level_strides.append(torch.full((height * width,), stride))
        ranges.append(torch.tensor(size_range, dtype=torch.float32).expand(height * width, 2))
    return torch.cat(points), torch.cat(level_strides), torch.cat(ranges)


def encode_dense_targets(targets: list[dict], points: torch.Tensor, strides: torch.Tensor,
                         ranges: torch.Tensor, center_radius: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Class and box-side distances for every location of every image of a batch.

    The whole batch is encoded at once (boxes of all images side by side, a box only
    competing for the locations of its own image): per-image calls cost more in
    dispatch than in arithmetic.

    Args:
        targets: per image ``{"boxes": [N, 4] normalised xyxy, "labels": [N] class indices}``.
        points, strides, ranges: ``[L, 2]``, ``[L]``, ``[L, 2]`` from :func:`dense_locations`.
        center_radius: half-width of a box's central region, in strides of the point's level.

    Returns:
        classes ``[B, L]`` long (``BACKGROUND`` = -1 where no box is assigned) and
        ltrb ``[B, L, 4]`` float distances to the box sides in strides (0 on background).
    """
    device = points.device
    num_images, num_points = len(targets), points.shape[0]
    classes = torch.full((num_images, num_points), BACKGROUND, dtype=torch.long, device=device)
    ltrb = torch.zeros(num_images, num_points, 4, device=device)
    counts = [len(t["labels"]) for t in targets]
    if sum(counts) == 0:
        return classes, ltrb
    boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device, torch.float32)   # [M, 4]
    labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(device, torch.long)        # [M]
    image = torch.repeat_interleave(torch.arange(num_images, device=device),
                                    torch.tensor(counts, device=device))                         # [M]
    x, y = points[:, 0:1], points[:, 1:2]                                   # [L, 1]
    distances = torch.stack([x - boxes[:, 0], y - boxes[:, 1],
                             boxes[:, 2] - x, boxes[:, 3] - y], dim=2)      # [L, M, 4]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2                              # [M, 2]
    radius = center_radius * strides[:, None]                               # [L, 1]
    central = ((x - centre[:, 0]).abs() <= radius) & ((y - centre[:, 1]).abs() <= radius)
    inside = distances.min(dim=2).values > 0
    reach = distances.max(dim=2).values                                     # [L, M]
    candidate = central & inside & (reach >= ranges[:, 0:1]) & (reach < ranges[:, 1:2])
    candidate |= _nearest_for_empty_boxes(candidate, boxes, centre, points, ranges)

    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])       # [M]
    own_image = image[None, :] == torch.arange(num_images, device=device)[:, None]              # [B, M]
    cost = areas.expand(num_images, num_points, -1).masked_fill(
        ~(candidate[None] & own_image[:, None, :]), math.inf)               # [B, L, M]
    best_cost, best_box = cost.min(dim=2)                                   # [B, L]
    positive = torch.isfinite(best_cost)
    classes[positive] = labels[best_box[positive]]
    chosen = distances[torch.arange(num_points, device=device)[None, :], best_box]              # [B, L, 4]
    ltrb[positive] = (chosen / strides[None, :, None])[positive]
    return classes, ltrb


def _nearest_for_empty_boxes(candidate: torch.Tensor, boxes: torch.Tensor, centre: torch.Tensor,
                             points: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``[L, M]`` mask: for each box without a candidate point, the point nearest its centre.

    The point is taken on the level whose range holds ``max(width, height) / 2`` (the
    farthest side distance seen from the box centre). Like every claim it goes to the
    smallest box when several want it.
    """
    half_size = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values / 2        # [M]
    on_level = (half_size >= ranges[:, 0:1]) & (half_size < ranges[:, 1:2])  # [L, M]
    gap = (points[:, None, :] - centre[None]).pow(2).sum(dim=2).masked_fill(~on_level, math.inf)  # [L, M]
    nearest = torch.zeros_like(candidate)
    empty = ~candidate.any(dim=0) & on_level.any(dim=0)                    # [M]
    nearest[gap.argmin(dim=0)[empty], torch.nonzero(empty).flatten()] = True
    return nearest
