"""Building blocks shared by the paper's heads: which backbone features they read, and dense paths.

The paper's heads start with a Flatten of the extractor's output and continue with Dense
layers. :class:`FeatureInput` makes that configurable: the pooled vector (a ViT's class
token, a CNN's global average pool), the spatial map (average-pooled to a ``grid x grid``
raster, or flattened whole when ``grid`` is null, which needs a fixed map size), or both.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from metaldefect.errors import ConfigError

SOURCES = ("pooled", "map", "pooled+map")


class FeatureInput(nn.Module):
    """Backbone features dict -> one flat vector per image ``[B, out_dim]``.

    Args:
        in_dims: ``{"pooled": D, "map": D, "map_size": (h, w), ...}`` of the backbone.
        source: "pooled", "map" or "pooled+map" (concatenated).
        grid: average-pool the map to ``grid x grid`` cells before flattening; None = flatten the map as it is.
    """

    def __init__(self, in_dims: dict, source: str = "pooled", grid: int | None = None):
        super().__init__()
        if source not in SOURCES:
            raise ConfigError(f"head input {source!r} is not one of {', '.join(SOURCES)}")
        self.source = source
        self.grid = grid
        dim = 0
        if source in ("pooled", "pooled+map"):
            dim += int(in_dims["pooled"])
        if source in ("map", "pooled+map"):
            if grid is not None:
                cells = grid * grid
            elif in_dims.get("map_size"):
                height, width = in_dims["map_size"]
                cells = height * width
            else:
                raise ConfigError("flattening the whole feature map needs its size; set the head's grid instead")
            dim += int(in_dims["map"]) * cells
        self.out_dim = dim

    def forward(self, features: dict) -> torch.Tensor:
        parts = []
        if self.source in ("pooled", "pooled+map"):
            parts.append(features["pooled"].float())
        if self.source in ("map", "pooled+map"):
            feature_map = features["map"].float()
            if self.grid is not None:
                feature_map = F.adaptive_avg_pool2d(feature_map, self.grid)
            parts.append(feature_map.flatten(1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def mlp(in_dim: int, sizes: Sequence[int], dropout: float | Sequence[float] = 0.0,
        out_dim: int | None = None) -> nn.Sequential:
    """Dense path: ``Linear -> ReLU [-> Dropout]`` per size, then an optional final ``Linear(out_dim)``.

    ``dropout`` is one rate after every hidden layer, or one rate per hidden layer (0 = none),
    e.g. the paper's ViT box path 128-Dropout.2-128-Dropout.2-64-64 is
    ``sizes=[128, 128, 64, 64], dropout=[0.2, 0.2, 0, 0]``.
    """
    sizes = [int(size) for size in sizes]
    rates = [float(dropout)] * len(sizes) if isinstance(dropout, (int, float)) else [float(r) for r in dropout]
    if len(rates) != len(sizes):
        raise ConfigError(f"dropout {list(rates)} must give one rate per layer of {sizes}")
    layers: list[nn.Module] = []
    width = in_dim
    for size, rate in zip(sizes, rates):
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        if rate > 0:
            layers.append(nn.Dropout(rate))
        width = size
    if out_dim is not None:
        layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def mlp_width(in_dim: int, sizes: Sequence[int]) -> int:
    """Output width of :func:`mlp` without a final layer."""
    return int(sizes[-1]) if len(sizes) else in_dim


def well_formed(boxes: torch.Tensor) -> torch.Tensor:
    """Make ``[..., 4]`` xyxy boxes well formed (x1 <= x2, y1 <= y2): a linear box output may swap corners."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([torch.minimum(x1, x2), torch.minimum(y1, y2),
                        torch.maximum(x1, x2), torch.maximum(y1, y2)], dim=-1)
