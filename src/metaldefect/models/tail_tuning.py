"""Tuning a ViT's last blocks on cached features: a frozen stem feeds a trainable tail.

Fine-tuning all of a ViT on 2 CPU cores costs a backbone pass per image per epoch. Its
first blocks can stay frozen, though, and then their output is the same every epoch:
cache it once, as for a frozen backbone, and train only the last ``tune_blocks`` blocks
(and the final norm) with the head. For ViT-S/14 at 224 px the last 2 blocks cost about
a sixth of a full forward and backward pass.

``cut = depth - tune_blocks``: blocks ``0 .. cut - 1`` are the stem, ``cut ..`` the tail.

:class:`BackboneStem` is what the feature cache runs (it quacks like a :class:`Backbone`
for :func:`metaldefect.engine.features.extract_features`) and returns stem features::

    {"pooled": [B, P, D],      # prefix (class) tokens after block cut - 1, before the final norm
     "map":    [B, D, h, w],   # patch tokens after block cut - 1, before the final norm
     "layers": [[B, D, h, w]]} # chosen layers below cut, through the final norm (as Backbone gives them)

:class:`TunedTail` takes those, runs the tail and the head, and gives the head's outputs;
its features are exactly those of ``Backbone.forward`` on the image (tested).
"""
from __future__ import annotations

import torch
from torch import nn

from metaldefect.errors import ConfigError
from metaldefect.models.backbones import Backbone


def stem_cut(backbone: Backbone, tune_blocks: int) -> int:
    """The index of the first tuned block; ConfigError unless a ViT keeps at least one block frozen."""
    if not backbone.is_vit:
        raise ConfigError(f"train.tune_blocks: {backbone.name} is not a ViT; tuning its last blocks on cached "
                          "features needs one (set train.frozen=false to fine-tune a CNN)")
    depth = len(backbone.model.blocks)
    if not 1 <= tune_blocks < depth:
        raise ConfigError(f"train.tune_blocks: expected 1 to {depth - 1} for {backbone.name} ({depth} blocks), "
                          f"got {tune_blocks}")
    return depth - tune_blocks


def _tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, h*w, D]`` -> ``[B, D, h, w]``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class BackboneStem(nn.Module):
    """The frozen blocks ``0 .. cut - 1`` of a ViT backbone (see module doc for the outputs).

    ``name`` tells the cache that these are not the backbone's usual features; ``layers``
    are the backbone's chosen layers below ``cut``; ``model`` is the whole timm model (its
    weights key the cache).
    """

    def __init__(self, backbone: Backbone, cut: int):
        super().__init__()
        self.backbone = backbone
        self.cut = cut
        self.name = f"{backbone.name}+stem{cut}"
        self.input_size = backbone.input_size
        self.layers = tuple(i for i in backbone.layers if i < cut)
        self.is_vit = True

    @property
    def model(self) -> nn.Module:
        return self.backbone.model

    def forward(self, images: torch.Tensor) -> dict:
        """``[B, 1 or 3, S, S]`` in [0, 1] -> stem features."""
        vit = self.backbone.model
        indices = sorted({*self.layers, self.cut - 1})
        outputs = vit.forward_intermediates(self.backbone.normalize(images), indices=indices, norm=False,
                                            stop_early=True, intermediates_only=True, output_fmt="NLC",
                                            return_prefix_tokens=True)
        by_block = dict(zip(indices, outputs))  # block -> (patch tokens [B, h*w, D], prefix [B, P, D])
        grid = tuple(vit.patch_embed.dynamic_feat_size(images.shape[2:]))
        patches, prefix = by_block[self.cut - 1]
        return {"pooled": prefix, "map": _tokens_to_map(patches, grid),
                "layers": [_tokens_to_map(vit.norm(by_block[i][0]), grid) for i in self.layers]}


class TunedTail(nn.Module):
    """Blocks ``cut ..`` and the final norm of ``model``'s ViT (trainable), then its head.

    ``forward(stem features) -> head outputs``. Everything else in ``model`` is frozen
    here. ``trained_state()`` holds the head and the tail under ``model``'s own names, so
    ``DefectModel.load_trained("tuned", state)`` puts them back into a fresh model.
    """

    def __init__(self, model: nn.Module, cut: int):
        super().__init__()
        self.model = model
        self.cut = cut
        vit = model.backbone.model
        self.prefixes = ("head.", "backbone.model.norm.",
                         *(f"backbone.model.blocks.{i}." for i in range(cut, len(vit.blocks))))
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(self.prefixes))

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def features(self, stem: dict) -> dict:
        """Stem features -> the backbone's features ({"pooled", "map", "layers"}, as ``Backbone.forward``)."""
        backbone = self.model.backbone
        vit = backbone.model
        grid = tuple(stem["map"].shape[2:])
        x = torch.cat([stem["pooled"], stem["map"].flatten(2).transpose(1, 2)], dim=1)
        layers = list(stem["layers"])
        prefix = vit.num_prefix_tokens
        for index in range(self.cut, len(vit.blocks)):
            x = vit.blocks[index](x)
            if index in backbone.layers:
                layers.append(_tokens_to_map(vit.norm(x)[:, prefix:], grid))
        final = vit.norm(x)
        features = {"pooled": vit.forward_head(final, pre_logits=True),
                    "map": _tokens_to_map(final[:, prefix:], grid), "layers": layers}
        if "image" in stem:  # for a head that reads the pixels too (see DenseHead.needs_image)
            features["image"] = stem["image"]
        return features

    def forward(self, stem: dict) -> dict[str, torch.Tensor]:
        return self.model.head(self.features(stem))

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(self.prefixes)}
