"""A small CNN on the image, learnt with a dense head, for detail finer than a ViT patch.

A frozen ViT-S/14 sees a 224 px image as 16 x 16 patches (12.5 px of a 200 px NEU-DET
image), while scratches and inclusions are 11-13 px wide: their sides fall inside a
patch. Frozen ImageNet CNN features at the patch grid did not help the head
(docs/benchmarks.md, session 5), so this stem learns its features for the task, as a
detector trained from scratch (YOLO) does.

The stem reads the image resized to ``16 * grid`` px (``grid`` = the ViT map's side), so
that its stride-8 map is twice as fine as the ViT map and its stride-16 map is the ViT
map's size. Convolutions with batch norm and SiLU, two per stage after the first
(YOLO's ``Conv`` block; a tiny CSP-free version of its backbone).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.SiLU(inplace=True))


class DetailStem(nn.Module):
    """Image ``[B, 1 or 3, S, S]`` in [0, 1] -> ``{2.0: [B, 4w, 2g, 2g], 1.0: [B, 8w, g, g]}`` for a ViT grid ``g``.

    Keys are scales relative to the ViT map, as the pyramid's ``scales``; ``w`` is ``width``.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.dims = {2.0: 4 * width, 1.0: 8 * width}
        self.stride4 = nn.Sequential(_conv(3, width, 2), _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1))
        self.stride8 = nn.Sequential(_conv(2 * width, 4 * width, 2), _conv(4 * width, 4 * width, 1))
        self.stride16 = nn.Sequential(_conv(4 * width, 8 * width, 2), _conv(8 * width, 8 * width, 1))

    def forward(self, images: torch.Tensor, grid: int) -> dict[float, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        side = 16 * grid
        if images.shape[-1] != side or images.shape[-2] != side:
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        # Centre the [0, 1] pixels; the first batch norm learns the scale.
        fine = self.stride8(self.stride4(images - 0.5))
        return {2.0: fine, 1.0: self.stride16(fine)}
