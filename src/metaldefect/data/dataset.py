"""Torch datasets: images (end-to-end training) or cached backbone features (frozen backbone).

Both yield ``(inputs, target)`` with the generic target of :mod:`metaldefect.data.encoders`;
:func:`collate` batches them into ``(images [B, 3, S, S] | features dict of [B, ...], targets list)``.
Random views are drawn per item from the torch RNG, so seeding the process (and DataLoader
workers, which torch seeds from it) makes them reproducible. A mix view (:mod:`metaldefect.data.mixing`)
joins an image with its partner of the same dataset, which ``mixes`` names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from metaldefect.data.images import load_image
from metaldefect.data.mixing import Mixes, is_mix_view, mix_images, mix_targets
from metaldefect.data.records import Record
from metaldefect.data.transforms import random_view, to_input_tensor, view_image, view_target

FeatureSource = Callable[[int, str], dict]
"""``source(index, view) -> {"pooled": [D], "map": [D, h, w], ...}`` for one image (no batch dim)."""


class ImageDataset(Dataset):
    """Images resized to ``input_size`` squares in [0, 1], with their targets.

    ``views`` lists the views ("hflip", "rot90", "mix_x", ...) drawn at random per item; empty = no
    augmentation. Mix views need ``mixes`` over these records' paths.
    """

    def __init__(self, records: Sequence[Record], targets: Sequence[dict], input_size: int,
                 views: Sequence[str] = (), mixes: Mixes | None = None):
        if len(records) != len(targets):
            raise ValueError("one target per record is needed")
        self.records = list(records)
        self.targets = list(targets)
        self.input_size = input_size
        self.views = _checked_views(views, mixes)
        self.mixes = mixes

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, index: int) -> torch.Tensor:
        return to_input_tensor(load_image(self.records[index].path), self.input_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self._image(index), self.targets[index]
        view = random_view(self.views) if self.views else "none"
        if is_mix_view(view):
            partner, cut, axis = self.mixes.partner(view, index)
            return (mix_images(image, self._image(partner), cut, axis),
                    mix_targets(target, self.targets[partner], cut, axis))
        return view_image(image, view), view_target(target, view)


def _checked_views(views: Sequence[str], mixes: Mixes | None) -> tuple[str, ...]:
    missing = [view for view in views if is_mix_view(view) and (mixes is None or view not in mixes.plans)]
    if missing:
        raise ValueError(f"mix view {missing[0]!r} needs its plan (mixes)")
    return tuple(views)


def with_images(source: FeatureSource, paths: Sequence[str | Path], input_size: int) -> FeatureSource:
    """``source`` whose feature dicts also hold ``"image"`` ``[3, S, S]``: image ``paths[index]`` resized
    as for the backbone and seen in the view, for a head that learns from the pixels too.

    Reading and resizing a 200 px NEU-DET image takes under a millisecond, so images are read
    afresh each time rather than held in memory.
    """
    def source_with_image(index: int, view: str) -> dict:
        features = source(index, view)
        features["image"] = view_image(to_input_tensor(load_image(paths[index]), input_size), view)
        return features
    return source_with_image


class FeatureDataset(Dataset):
    """Cached backbone features of each image, one view drawn at random per item when ``views`` is set.

    ``source(index, view)`` returns one image's feature dict; the dataset knows nothing of
    how features are stored (the engine's feature cache provides the source). For a mix view the
    source holds the mixed image's features, and ``mixes`` (over the same images, in index order)
    says which partner and cut its target is made of.
    """

    def __init__(self, source: FeatureSource, targets: Sequence[dict], views: Sequence[str] = (),
                 mixes: Mixes | None = None):
        self.source = source
        self.targets = list(targets)
        self.views = _checked_views(views, mixes)
        self.mixes = mixes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[dict, dict]:
        view = random_view(self.views) if self.views else "none"
        if is_mix_view(view):
            partner, cut, axis = self.mixes.partner(view, index)
            return self.source(index, view), mix_targets(self.targets[index], self.targets[partner], cut, axis)
        return self.source(index, view), view_target(self.targets[index], view)


def collate(batch: list[tuple]) -> tuple:
    """Stack inputs (a tensor, or a dict of tensors / lists of tensors) and keep targets as a list."""
    inputs, targets = zip(*batch)
    first = inputs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(inputs), list(targets)
    stacked = {}
    for key, value in first.items():
        if isinstance(value, (list, tuple)):
            stacked[key] = [torch.stack([item[key][i] for item in inputs]) for i in range(len(value))]
        else:
            stacked[key] = torch.stack([item[key] for item in inputs])
    return stacked, list(targets)
