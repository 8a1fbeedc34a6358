"""Image and box transforms: resize to the square network input, box-aware flips.

Boxes here are normalised xyxy (``[N, 4]`` in [0, 1]). The resize is uniform per axis,
so normalised boxes are unchanged by it; a flip mirrors them. The same flips are what
the feature cache stores as views ("hflip", "vflip"), so cached and end-to-end training
see the same augmentation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

VIEWS = ("none", "hflip", "vflip")


def to_input_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """``[H, W, 3]`` uint8 image -> ``[3, size, size]`` float in [0, 1] (antialiased bilinear resize)."""
    # torch.tensor copies: arrays from PIL are read-only.
    tensor = torch.tensor(image, dtype=torch.uint8).permute(2, 0, 1).float().div_(255.0)
    if tensor.shape[1:] != (size, size):
        tensor = F.interpolate(tensor[None], size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp_(0.0, 1.0)
    return tensor


def flip_boxes(boxes: torch.Tensor, view: str) -> torch.Tensor:
    """Mirror normalised xyxy boxes ``[N, 4]`` for a view: hflip x -> 1 - x, vflip y -> 1 - y."""
    if view == "none":
        return boxes
    boxes = boxes.clone()
    if view == "hflip":
        boxes[:, [0, 2]] = 1.0 - boxes[:, [2, 0]]
    elif view == "vflip":
        boxes[:, [1, 3]] = 1.0 - boxes[:, [3, 1]]
    else:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    return boxes


def flip_image(image: torch.Tensor, view: str) -> torch.Tensor:
    """Mirror an image tensor ``[C, H, W]`` for a view."""
    if view == "hflip":
        return image.flip(-1)
    if view == "vflip":
        return image.flip(-2)
    if view == "none":
        return image
    raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


def flip_target(target: dict, view: str) -> dict:
    """A copy of a generic target with its boxes mirrored for ``view``."""
    if view == "none":
        return target
    return {**target, "boxes": flip_boxes(target["boxes"], view)}


def random_view(views: tuple[str, ...] | list[str], generator: torch.Generator | None = None) -> str:
    """Pick uniformly among "none" and the enabled flip views (each flip then has p = 1 / (1 + len(views)))."""
    choices = ("none", *views)
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]
