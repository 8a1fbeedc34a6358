"""The dense head's neck: several ViT layers fused into one map and resampled into a pyramid.

The patch maps of several ViT blocks are normalised, concatenated and projected to
``channels``; a simple feature pyramid in the style of ViTDet (Li et al., 2022) is built
from that one stride-``s`` map: transposed convolutions up (scale 2, 4), identity
(scale 1) and max-pooling down (scale 1/2, 1/4, ...), each level followed by a 1x1 and
a 3x3 convolution.
"""
from __future__ import annotations

import math

import torch
from timm.layers import LayerNorm2d
from torch import nn

from metaldefect.errors import ConfigError


class SimpleFeaturePyramid(nn.Module):
    """Fuse several ViT layers into one map and resample it into a pyramid.

    Args:
        layer_dims: channels of each input layer map.
        channels: channels of every pyramid level.
        scales: each level's size relative to the ViT map (2.0 = twice as fine), finest first.
        dropout: probability of zeroing a whole channel of the normalised layers while training.
        detail_dims: channels of learnt image maps by scale (:class:`.DetailStem`'s ``dims``); a level
            of that scale adds a 1x1 projection of the map to its resampled ViT map (FPN's lateral).
    """

    def __init__(self, layer_dims: list[int], channels: int, scales: list[float], dropout: float = 0.0,
                 detail_dims: dict[float, int] | None = None):
        super().__init__()
        if list(scales) != sorted(scales, reverse=True):
            raise ConfigError(f"pyramid scales must go from finest to coarsest, got {scales}")
        self.scales = [float(scale) for scale in scales]
        self.layer_norms = nn.ModuleList(LayerNorm2d(dim) for dim in layer_dims)
        self.dropout = nn.Dropout2d(dropout)
        self.fuse = nn.Conv2d(sum(layer_dims), channels, kernel_size=1)
        self.resamplers = nn.ModuleList(self._resampler(scale, channels) for scale in scales)
        self.laterals = nn.ModuleDict({str(index): nn.Conv2d(detail_dims[scale], channels, kernel_size=1)
                                       for index, scale in enumerate(scales) if scale in (detail_dims or {})})
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels))
            for _ in scales)

    @staticmethod
    def _resampler(scale: float, channels: int) -> nn.Module:
        if scale == 4:
            return nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), LayerNorm2d(channels),
                                 nn.GELU(), nn.ConvTranspose2d(channels, channels, 2, stride=2))
        if scale == 2:
            return nn.ConvTranspose2d(channels, channels, 2, stride=2)
        if scale == 1:
            return nn.Identity()
        factor = round(1 / scale)
        if scale < 1 and math.isclose(factor * scale, 1.0) and factor & (factor - 1) == 0:
            return nn.MaxPool2d(kernel_size=factor, stride=factor)
        raise ConfigError(f"pyramid scale must be 4, 2, 1 or 1/2^k, got {scale}")

    def forward(self, layers: list[torch.Tensor], detail: dict[float, torch.Tensor] | None = None
                ) -> list[torch.Tensor]:
        """``layers``: ``[B, D_l, h, w]`` each -> levels ``[B, channels, h * scale, w * scale]``.

        ``detail``: the learnt maps by scale, ``[B, detail_dims[scale], h * scale, w * scale]``
        (needed when ``detail_dims`` was given).
        """
        device = layers[0].device.type
        # Under autocast the fuse convolution reads its input in the autocast dtype anyway: casting each normalised
        # layer first halves the memory the concatenation and the dropout move (the bf16 training step 1.09x
        # faster in one timing, docs/benchmarks.md, session 16). Outside autocast (float32 training, inference)
        # nothing changes.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        normed = torch.cat([norm(x.float()).to(dtype) for norm, x in zip(self.layer_norms, layers)], dim=1)
        fused = self.fuse(self.dropout(normed))
        levels = [resample(fused) for resample in self.resamplers]
        for index, lateral in self.laterals.items():
            levels[int(index)] = levels[int(index)] + lateral(detail[self.scales[int(index)]])
        return [output(level) for output, level in zip(self.outputs, levels)]
