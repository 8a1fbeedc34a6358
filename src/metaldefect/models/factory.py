"""``create_model``: a backbone and a head, by name, as one module (``backbone -> features -> head``)."""
from __future__ import annotations

import torch
from torch import nn

from metaldefect.models.backbones import Backbone, create_backbone
from metaldefect.models.heads import create_head


class DefectModel(nn.Module):
    """A backbone and a head.

    ``forward(images [B, 1 or 3, S, S] in [0, 1]) -> head outputs``;
    ``forward_head(features) -> head outputs`` for features from the cache.
    ``in_dims`` describes the backbone's features as heads need them:
    ``{"pooled": D, "map": D, "map_size": (h, w), "layers": [D_l, ...],
    "layer_sizes": [(h_l, w_l), ...], "stride": s}``.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, in_dims: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_dims = in_dims

    @property
    def task(self) -> str:
        return self.head.task

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        if getattr(self.head, "needs_image", False):  # a head that learns from the pixels too
            features["image"] = images
        return self.head(features)

    def forward_head(self, features: dict) -> dict[str, torch.Tensor]:
        return self.head(features)

    def load_trained(self, part: str, state: dict[str, torch.Tensor]) -> None:
        """Load what a run trained: part "head" (the head's state), "model" (everything) or "tuned"
        (the head and the last ViT blocks, under this module's names: see ``TunedTail``).

        RuntimeError when ``state`` does not fit (as ``load_state_dict``) or ``part`` is unknown.
        """
        if part == "head":
            self.head.load_state_dict(state)
        elif part == "model":
            self.load_state_dict(state)
        elif part == "tuned":
            missing, unexpected = self.load_state_dict(state, strict=False)
            missing_head = [key for key in missing if key.startswith("head.")]
            if unexpected or missing_head:
                raise RuntimeError(f"unexpected keys {unexpected[:3]}, missing head keys {missing_head[:3]}")
        else:
            raise RuntimeError(f"unknown trained part {part!r} (expected head, model or tuned)")

    def set_trainable(self, trainable_layers: int | None) -> None:
        """Freeze the backbone except its last ``trainable_layers`` parameterised layers (None = train all).

        A "layer" is a leaf module holding parameters (a conv, a norm, a linear), counted
        from the output end, which is how Keras counts "the last 10 layers" of InceptionV3
        apart from its parameter-free layers. The head always trains.
        """
        leaves = [m for m in self.backbone.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
        if trainable_layers is None:
            trainable = set(leaves)
        else:
            trainable = set(leaves[max(0, len(leaves) - trainable_layers):])
        for module in leaves:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(module in trainable)
        # Parameters held directly by non-leaf modules (a ViT's cls token, position embedding) train only with all.
        for module in self.backbone.modules():
            if module not in leaves:
                for parameter in module.parameters(recurse=False):
                    parameter.requires_grad_(trainable_layers is None)


def feature_dims(backbone: Backbone) -> dict:
    """The backbone's feature sizes, read from one forward pass of a blank image at its input size."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        size = backbone.input_size
        features = backbone(torch.zeros(1, 3, size, size, device=next(backbone.buffers()).device))
    backbone.train(was_training)
    return {
        "pooled": int(features["pooled"].shape[1]),
        "map": int(features["map"].shape[1]),
        "map_size": tuple(int(v) for v in features["map"].shape[2:]),
        "layers": [int(layer.shape[1]) for layer in features["layers"]],
        "layer_sizes": [tuple(int(v) for v in layer.shape[2:]) for layer in features["layers"]],
        "stride": int(backbone.feature_stride),
    }


def create_model(backbone_name: str, head_name: str, num_classes: int, pretrained: bool = True,
                 weights_file: str | None = None, input_size: int = 224, layers: list[int] | None = None,
                 head_kwargs: dict | None = None) -> DefectModel:
    """Backbone ``backbone_name`` (timm name; weights resolved offline) with head ``head_name``.

    Raises WeightsError when ``pretrained`` weights cannot be had, ConfigError for unknown
    names or head options.
    """
    backbone = create_backbone(backbone_name, pretrained=pretrained, weights_file=weights_file,
                               input_size=input_size, layers=tuple(layers) if layers is not None else None)
    in_dims = feature_dims(backbone)
    head = create_head(head_name, in_dims, num_classes, **(head_kwargs or {}))
    return DefectModel(backbone, head, in_dims)
