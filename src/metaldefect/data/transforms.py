"""Image and box transforms: resize to the square network input, box-aware views.

Boxes here are normalised xyxy (``[N, 4]`` in [0, 1]). The resize is uniform per axis,
so normalised boxes are unchanged by it. A view is one of the eight symmetries of a
square (the dihedral group: flips, quarter turns, transposes) or a fixed 4/3 zoom onto a
corner or the centre ("zoom_tl", ..., "zoom_c"); it moves the boxes with the image. The
same views are what the feature cache stores ("hflip", "zoom_c", ...), so cached and
end-to-end training see the same augmentation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Each view as steps applied in order: "t" transposes (x <-> y), "h" mirrors x, "v" mirrors y.
# Quarter turns are counter-clockwise as seen on screen (numpy's rot90).
VIEW_STEPS = {"none": "", "hflip": "h", "vflip": "v", "rot180": "hv", "transpose": "t", "rot90": "tv",
              "rot270": "th", "antitranspose": "thv"}
# Zoom views: a square crop of ZOOM_SIDE of the image's side, scaled back up to the full
# size (a 4/3 zoom), at the corner or centre given by its top-left (x, y) in image fractions.
# Boxes are clipped to the crop; a box keeps its label only if at least ZOOM_KEEP of its
# area stays in view (YOLO's random_perspective keeps boxes down to 10 %: a part of a
# defect is still that defect, but a sliver at the border is not recognisable).
ZOOM_SIDE = 0.75
ZOOM_KEEP = 0.25
ZOOM_ORIGINS = {"zoom_tl": (0.0, 0.0), "zoom_tr": (0.25, 0.0), "zoom_bl": (0.0, 0.25), "zoom_br": (0.25, 0.25),
                "zoom_c": (0.125, 0.125)}
VIEWS = (*VIEW_STEPS, *ZOOM_ORIGINS)


def _steps(view: str) -> str:
    try:
        return VIEW_STEPS[view]
    except KeyError:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}") from None


def _zoom_boxes(boxes: torch.Tensor, view: str) -> torch.Tensor:
    """Boxes ``[N, 4]`` in the zoomed view's coordinates, clipped to it (some may be empty)."""
    x0, y0 = ZOOM_ORIGINS[view]
    return ((boxes - boxes.new_tensor([x0, y0, x0, y0])) / ZOOM_SIDE).clamp(0.0, 1.0)


def _zoom_image(image: torch.Tensor, view: str) -> torch.Tensor:
    height, width = image.shape[-2:]
    x0, y0 = ZOOM_ORIGINS[view]
    top, left = round(y0 * height), round(x0 * width)
    crop = image[..., top:top + round(ZOOM_SIDE * height), left:left + round(ZOOM_SIDE * width)]
    flat = crop.reshape(-1, 1, *crop.shape[-2:])
    zoomed = F.interpolate(flat.float(), size=(height, width), mode="bilinear", align_corners=False)
    return zoomed.reshape(*image.shape).to(image.dtype)


def to_input_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """``[H, W, 3]`` uint8 image -> ``[3, size, size]`` float in [0, 1] (antialiased bilinear resize)."""
    # torch.tensor copies: arrays from PIL are read-only.
    tensor = torch.tensor(image, dtype=torch.uint8).permute(2, 0, 1).float().div_(255.0)
    if tensor.shape[1:] != (size, size):
        tensor = F.interpolate(tensor[None], size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp_(0.0, 1.0)
    return tensor


def view_boxes(boxes: torch.Tensor, view: str) -> torch.Tensor:
    """Normalised xyxy boxes ``[N, 4]`` moved as :func:`view_image` moves the image.

    Zoom views clip the boxes to the crop; :func:`view_target` also drops the boxes mostly cut off.
    """
    if view in ZOOM_ORIGINS:
        return _zoom_boxes(boxes, view)
    for step in _steps(view):
        if step == "t":
            boxes = boxes[:, [1, 0, 3, 2]]
        elif step == "h":
            boxes = torch.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], dim=1)
        else:
            boxes = torch.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]], dim=1)
    return boxes


def view_image(image: torch.Tensor, view: str) -> torch.Tensor:
    """An image tensor ``[..., H, W]`` seen in ``view`` (a transpose makes it ``[..., W, H]``)."""
    if view in ZOOM_ORIGINS:
        return _zoom_image(image, view)
    for step in _steps(view):
        image = image.transpose(-1, -2) if step == "t" else image.flip(-1 if step == "h" else -2)
    return image


def view_target(target: dict, view: str) -> dict:
    """A copy of a generic target with its boxes moved for ``view`` (the target itself for "none").

    In a zoom view, boxes with less than ``ZOOM_KEEP`` of their area in view are dropped with their labels.
    """
    if view == "none":
        return target
    boxes = view_boxes(target["boxes"], view)
    if view not in ZOOM_ORIGINS:
        return {**target, "boxes": boxes}
    before = _area(target["boxes"]) / ZOOM_SIDE**2
    keep = _area(boxes) >= ZOOM_KEEP * before.clamp(min=1e-12)
    return {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)


def random_view(views: tuple[str, ...] | list[str], generator: torch.Generator | None = None) -> str:
    """Pick uniformly among "none" and the enabled views (each then has p = 1 / (1 + len(views)))."""
    choices = ("none", *views)
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]
