"""Mix views: two training images cut and joined into one (CutMix at the pixel level), boxes clipped.

A mix view of image A is A up to a cut and its partner B after it, along x (``mix_x``: A on the
left, B on the right) or y (``mix_y``: A on top). The cut lies between 3/8 and 5/8 of the side, on
a multiple of 1/32 (half a ViT-S/14 patch at 224 px: whole pixels there, so the boxes move exactly
as the image does). Each box keeps the part on its image's side of the cut; a part thinner than
1/32 across the cut is dropped (a sliver under half a patch wide).

Why pixels and not the cached token maps: a ViT token's features carry the whole image's context,
so halves of two token maps side by side are features no image gives. Mixing the pixels and
running the backbone on the result costs one forward pass per image and mix view, once: the
feature cache stores the mixed images' features like any other view.

A partner shares its image's main class (:func:`metaldefect.data.encoders.image_label`): NEU-DET's
images hold one class each, and a frozen ViT's tokens carry which texture the whole image shows,
so a same-class pair keeps that consistent while its boxes land in new places and at new cuts.

The pairing and the cuts are a fixed function of the view, the image paths and their main classes
(:func:`mix_plan`), so the cache entry of a mix view, whose key holds :meth:`MixPlan.digest`, and the
dataset that reads it agree on what each row shows.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import torch

from metaldefect.data.encoders import image_label

# View -> the axis the cut runs across (0: x, the cut is a vertical line; 1: y, a horizontal one).
MIX_VIEWS = {"mix_x": 0, "mix_y": 1}
STEP = 1 / 32
CUTS = tuple(k * STEP for k in range(12, 21))  # 3/8 .. 5/8 of the side
MIN_PART = STEP


@dataclass(frozen=True)
class MixPlan:
    """Which partner and cut each image of a mix view gets.

    ``partner[path]`` is the path of the image after the cut; ``cut[path]`` the cut as a fraction
    of the side; ``axis`` 0 for x, 1 for y.
    """

    view: str
    axis: int
    partner: dict[str, str]
    cut: dict[str, float]

    def digest(self) -> str:
        """A short hash of the pairing and cuts, for the feature cache's key."""
        text = json.dumps({"view": self.view, "partner": self.partner, "cut": self.cut}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def is_mix_view(view: str) -> bool:
    return view in MIX_VIEWS


def mix_plan(view: str, paths: list[str], groups: list[int]) -> MixPlan:
    """The pairing and cuts of ``view`` for the images ``paths`` with main classes ``groups`` (-1: none).

    Deterministic: the same paths and groups give the same plan whatever their order. Each image's
    partner is another image of its group, drawn at random (an image alone in its group is paired
    with any other image).
    """
    if view not in MIX_VIEWS:
        raise ValueError(f"unknown mix view {view!r}; expected one of {tuple(MIX_VIEWS)}")
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    generator = torch.Generator().manual_seed(zlib.crc32(view.encode()))
    members: dict[int, list[int]] = {}
    for i in order:
        members.setdefault(groups[i], []).append(i)
    partner, cut = {}, {}
    for i in order:
        pool = [j for j in members[groups[i]] if j != i] or [j for j in order if j != i] or [i]
        j = pool[int(torch.randint(len(pool), (1,), generator=generator))]
        partner[paths[i]] = paths[j]
        cut[paths[i]] = CUTS[int(torch.randint(len(CUTS), (1,), generator=generator))]
    return MixPlan(view, MIX_VIEWS[view], partner, cut)


def mix_images(first: torch.Tensor, second: torch.Tensor, cut: float, axis: int) -> torch.Tensor:
    """``first`` ``[..., H, W]`` up to ``cut`` of its side along ``axis`` (0: x), ``second`` after it."""
    if first.shape != second.shape:
        raise ValueError(f"mixed images must have one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    dim = -1 if axis == 0 else -2
    at = round(cut * first.shape[dim])
    return torch.cat([first.narrow(dim, 0, at), second.narrow(dim, at, first.shape[dim] - at)], dim=dim)


def mix_targets(first: dict, second: dict, cut: float, axis: int) -> dict:
    """The target of :func:`mix_images`: each image's boxes ``[N, 4]`` (normalised xyxy) clipped to its
    side of the cut, parts thinner than :data:`MIN_PART` across it dropped with their labels."""
    low, high = (0, 2) if axis == 0 else (1, 3)
    parts = []
    for target, (start, end) in ((first, (0.0, cut)), (second, (cut, 1.0))):
        boxes = target["boxes"].clone()
        boxes[:, low] = boxes[:, low].clamp(min=start)
        boxes[:, high] = boxes[:, high].clamp(max=end)
        keep = boxes[:, high] - boxes[:, low] >= MIN_PART - 1e-6
        parts.append((boxes[keep], target["labels"][keep]))
    return {**first, "boxes": torch.cat([parts[0][0], parts[1][0]]), "labels": torch.cat([parts[0][1], parts[1][1]])}


def mix_plans(views, paths: list[str], targets: list[dict]) -> dict[str, MixPlan]:
    """The plan of each mix view among ``views`` for the images ``paths`` (their generic ``targets``
    give each image's main class); other views are left out."""
    groups = [-1 if not t["labels"].numel() else image_label(t["labels"].tolist()) for t in targets]
    return {view: mix_plan(view, paths, groups) for view in views if view in MIX_VIEWS}


class Mixes:
    """The mix views' plans seen from one list of images (a dataset's order): partners as indices."""

    def __init__(self, plans: dict[str, MixPlan], paths: list[str]):
        self.plans = plans
        self.paths = [str(path) for path in paths]
        self.index = {path: i for i, path in enumerate(self.paths)}

    def partner(self, view: str, index: int) -> tuple[int, float, int]:
        """Image ``index``'s partner (an index of the same list), cut and axis in ``view``."""
        plan, path = self.plans[view], self.paths[index]
        return self.index[plan.partner[path]], plan.cut[path], plan.axis
