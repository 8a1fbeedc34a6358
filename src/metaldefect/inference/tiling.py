"""Tiling for images much larger than the model's input (GC10-DET's 2048 x 1000).

A model sees a square of ``input_size`` pixels; squeezing a 2048 x 1000 image into it
shrinks small defects below what the network resolves. Tiling cuts the image into
overlapping squares, runs the model on each, maps the boxes back to the whole image
and merges them:

1. a detection cut by an *inner* tile edge (an edge that is not the image border) is
   dropped when another tile saw a whole detection of the same class covering most of
   it (any defect no larger than the overlap lies wholly inside some tile);
2. what remains is merged with class-wise NMS (``torchvision.ops.batched_nms``).

``tile`` settings: ``"auto"`` tiles with squares of ``input_size`` pixels when the
image's longer side exceeds ``AUTO_FACTOR * input_size`` (it assumes the model was
trained on images about its input size, as NEU-DET's 200 px images; a model trained
on whole large images wants ``"off"``); ``"off"`` never tiles; an integer ``N`` tiles
with ``N``-pixel squares whenever the image is larger than ``N``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torchvision.ops import batched_nms

from metaldefect.data.records import Detection
from metaldefect.errors import ConfigError

AUTO_FACTOR = 2.0
DEFAULT_OVERLAP = 0.25
DEFAULT_MERGE_IOU = 0.5
EDGE_MARGIN = 2.0  # pixels: a box side this close to an inner tile edge counts as cut by it
WHOLE_COVER = 0.5  # fraction of a cut box that a whole same-class box must cover to replace it

Tile = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels (x1, y1 exclusive)


def parse_tile(value: str | int | None) -> str | int:
    """``"auto"`` | ``"off"`` | a tile side in pixels (int or digits); ConfigError otherwise."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "off"):
            return text
        if not text.isdigit():
            raise ConfigError(f"tile {value!r}: expected 'auto', 'off' or a tile size in pixels")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 16:
        raise ConfigError(f"tile {value!r}: a tile size must be an integer of at least 16 pixels")
    return value


def check_overlap(overlap: float) -> float:
    if not 0.0 <= overlap < 0.9:
        raise ConfigError(f"tile overlap {overlap}: expected a fraction of the tile in [0, 0.9)")
    return float(overlap)


def tile_side(width: int, height: int, tile: str | int, input_size: int) -> int | None:
    """The tile side to use for a ``width x height`` image, or None to run on the whole image."""
    tile = parse_tile(tile)
    longer = max(width, height)
    if tile == "off":
        return None
    if tile == "auto":
        return input_size if longer > AUTO_FACTOR * input_size else None
    return tile if longer > tile else None


def _starts(length: int, side: int, overlap: float) -> list[int]:
    """Start offsets along one axis: evenly spread, first at 0, last flush with the end."""
    if length <= side:
        return [0]
    step = side * (1.0 - overlap)
    count = math.ceil((length - side) / step) + 1
    return [round(i * (length - side) / (count - 1)) for i in range(count)]


def make_tiles(width: int, height: int, side: int, overlap: float = DEFAULT_OVERLAP) -> list[Tile]:
    """Overlapping ``side x side`` tiles covering the image (shorter along an axis smaller than ``side``).

    Neighbouring tiles overlap by at least ``overlap * side`` pixels.
    """
    check_overlap(overlap)
    tiles = []
    for y in _starts(height, side, overlap):
        for x in _starts(width, side, overlap):
            tiles.append((x, y, min(x + side, width), min(y + side, height)))
    return tiles


def _cut_by_inner_edge(boxes: torch.Tensor, tiles: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[N]`` True where an image-pixel box ``[N, 4]`` touches an edge of its tile ``[N, 4]`` that is
    not the image border."""
    x0, y0, x1, y1 = tiles.unbind(dim=1)
    return (((x0 > 0) & (boxes[:, 0] <= x0 + EDGE_MARGIN)) | ((y0 > 0) & (boxes[:, 1] <= y0 + EDGE_MARGIN))
            | ((x1 < width) & (boxes[:, 2] >= x1 - EDGE_MARGIN)) | ((y1 < height) & (boxes[:, 3] >= y1 - EDGE_MARGIN)))


def _covered_fraction(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``[N, M]``: the part of each of ``boxes`` ``[N, 4]`` inside each of ``others`` ``[M, 4]``.

    Intersection over the first box's own area; torchvision has IoU but not this ratio.
    """
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    return intersection / area.clamp(min=1e-9)[:, None]


def _replaced_by_whole_views(boxes: torch.Tensor, label_ids: torch.Tensor, tile_ids: torch.Tensor,
                             cut: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``[N]`` True for cut boxes that a whole same-class box from another tile covers by >= WHOLE_COVER."""
    replaced = torch.zeros(len(boxes), dtype=torch.bool)
    whole = (~cut).nonzero().flatten()
    cut_ids = cut.nonzero().flatten()
    if not len(whole):
        return replaced
    for start in range(0, len(cut_ids), chunk):  # chunks bound the [cut, whole] matrix's memory
        ids = cut_ids[start:start + chunk]
        covered = _covered_fraction(boxes[ids], boxes[whole])
        eligible = (label_ids[ids, None] == label_ids[None, whole]) & (tile_ids[ids, None] != tile_ids[None, whole])
        replaced[ids] = ((covered >= WHOLE_COVER) & eligible).any(dim=1)
    return replaced


def merge_tile_detections(per_tile: list[list[Detection]], tiles: list[Tile], width: int, height: int,
                          iou: float = DEFAULT_MERGE_IOU) -> list[Detection]:
    """Detections of each tile (boxes in tile pixels) -> one list for the image, best first."""
    items = [(detection, index) for index, detections in enumerate(per_tile) for detection in detections]
    if not items:
        return []
    tile_ids = torch.tensor([index for _, index in items])
    tile_boxes = torch.tensor(tiles, dtype=torch.float64)[tile_ids]                          # [N, 4]
    boxes = torch.tensor([d.box for d, _ in items], dtype=torch.float64) + tile_boxes[:, [0, 1, 0, 1]]
    scores = torch.tensor([d.score for d, _ in items], dtype=torch.float64)
    labels = [d.label for d, _ in items]
    names = {name: i for i, name in enumerate(sorted(set(labels)))}
    label_ids = torch.tensor([names[label] for label in labels])

    cut = _cut_by_inner_edge(boxes, tile_boxes, width, height)
    kept = (~_replaced_by_whole_views(boxes, label_ids, tile_ids, cut)).nonzero().flatten()
    order = kept[batched_nms(boxes[kept], scores[kept], label_ids[kept], iou)]
    return [Detection(box=boxes[i].tolist(), label=labels[i], score=float(scores[i])) for i in order.tolist()]


def predict_tiled(image: np.ndarray, detect: Callable[[list[np.ndarray]], list[list[Detection]]],
                  side: int, overlap: float = DEFAULT_OVERLAP, iou: float = DEFAULT_MERGE_IOU) -> list[Detection]:
    """Run ``detect`` on overlapping tiles of ``image`` ``[H, W, 3]`` and merge into image pixels.

    ``detect(crops)`` takes a list of ``[h, w, 3]`` arrays and returns, per crop, detections
    with boxes in that crop's pixels.
    """
    height, width = image.shape[:2]
    tiles = make_tiles(width, height, side, overlap)
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in tiles]
    return merge_tile_detections(detect(crops), tiles, width, height, iou)
