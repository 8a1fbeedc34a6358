"""Image and box transforms: resize to the square network input, box-aware views.

Boxes here are normalised xyxy (``[N, 4]`` in [0, 1]). The resize is uniform per axis,
so normalised boxes are unchanged by it. A view is one of the eight symmetries of a
square (the dihedral group: flips, quarter turns, transposes), a shift by part of a ViT
patch ("shift_r", "shift_d", "shift_rd", ...), or a flip then a half-patch shift ("hflip+shift_rd",
...); it moves the boxes with the image. The same views are what the feature cache stores
("hflip", "rot90", ...), so cached and end-to-end training see the same augmentation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Each view as steps applied in order: "t" transposes (x <-> y), "h" mirrors x, "v" mirrors y.
# Quarter turns are counter-clockwise as seen on screen (numpy's rot90).
VIEW_STEPS = {"none": "", "hflip": "h", "vflip": "v", "rot180": "hv", "transpose": "t", "rot90": "tv",
              "rot270": "th", "antitranspose": "thv"}
# Shift views: the image moved right and/or down by a fraction of its side, the uncovered border
# filled by repeating the edge pixels, boxes moved with it and clipped. A frozen ViT then sees each
# box side at another place inside its patch, which flips cannot give (they keep an edge's offset in
# its patch, mirrored). SHIFT, 1/32, is half a patch of ViT-S/14 at 224 px (7 px); the "_quarter" and
# "_3quarter" views move by 4 and 10 px there (1/56 and 5/112: whole pixels at 224 px, so the
# boxes move exactly as the image does), about a quarter and three quarters of a patch. The fractions
# are fixed, so at other sizes the offsets inside a patch differ (at 448 px, 1/32 is a whole patch).
SHIFT = 1 / 32
SHIFTS = {"shift_r": (SHIFT, 0.0), "shift_d": (0.0, SHIFT), "shift_rd": (SHIFT, SHIFT),
          "shift_rd_quarter": (1 / 56, 1 / 56), "shift_rd_3quarter": (5 / 112, 5 / 112)}
# Composite views: a flip, then a half-patch shift of the flipped image. The plain shifts keep the
# image's orientation, the plain flips its patch grid; each composite is a token map neither gives
# (the flipped image with its box sides at other places inside their patches).
COMPOSITES = tuple(f"{flip}+{shift}" for flip in ("hflip", "vflip", "rot180")
                   for shift in ("shift_r", "shift_d", "shift_rd"))
VIEWS = (*VIEW_STEPS, *SHIFTS, *COMPOSITES)


def _parts(view: str) -> list[str]:
    """The elementary views ``view`` applies in order: ``"hflip+shift_rd"`` -> ``["hflip", "shift_rd"]``."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    return view.split("+")


def _steps(view: str) -> str:
    try:
        return VIEW_STEPS[view]
    except KeyError:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}") from None


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

    Shift views clip the boxes to the image; :func:`view_target` drops those left empty.
    """
    if "+" in view:
        for part in _parts(view):
            boxes = view_boxes(boxes, part)
        return boxes
    if view in SHIFTS:
        dx, dy = SHIFTS[view]
        return (boxes + boxes.new_tensor([dx, dy, dx, dy])).clamp(0.0, 1.0)
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
    if "+" in view:
        for part in _parts(view):
            image = view_image(image, part)
        return image
    if view in SHIFTS:
        return _shift_image(image, *SHIFTS[view])
    for step in _steps(view):
        image = image.transpose(-1, -2) if step == "t" else image.flip(-1 if step == "h" else -2)
    return image


def _shift_image(image: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """``image`` ``[..., H, W]`` moved right by ``dx`` and down by ``dy`` of its side.

    The shift is rounded to whole pixels (exact at 224 px); edge pixels fill the border.
    """
    height, width = image.shape[-2:]
    right, down = round(dx * width), round(dy * height)
    kept = image[..., :height - down, :width - right].reshape(-1, 1, height - down, width - right)
    return F.pad(kept.float(), (right, 0, down, 0), mode="replicate").reshape(image.shape).to(image.dtype)


def view_target(target: dict, view: str) -> dict:
    """A copy of a generic target with its boxes moved for ``view`` (the target itself for "none").

    A view with a shift drops the boxes it pushes wholly out of the image, with their labels.
    """
    if view == "none":
        return target
    boxes = view_boxes(target["boxes"], view)
    if not any(part in SHIFTS for part in _parts(view)):
        return {**target, "boxes": boxes}
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}


def random_view(views: tuple[str, ...] | list[str], generator: torch.Generator | None = None) -> str:
    """Pick uniformly among "none" and the enabled views (each then has p = 1 / (1 + len(views)))."""
    choices = ("none", *views)
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]
