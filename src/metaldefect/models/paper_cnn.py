"""The paper's custom CNN (section III-B) as a timm model named ``paper_cnn``.

Conv stack of docs/paper-notes.md with Keras' default "valid" padding and ReLU
activations (the notes do not name the activation; ReLU is our assumption): for a
64x64 input, Conv 64 3x3 + MaxPool 2 -> Conv 128 3x3 + MaxPool 2 -> Conv 256 3x3 +
MaxPool 2 -> Conv 512 2x2, giving a ``[batch, 512, 5, 5]`` map. The dense layers
(512-256-classes) belong to the classification head, not the backbone. It is trained
from scratch, so there are no pretrained weights; inputs are in [0, 1] (the notebook's
``1/255`` rescale), hence mean 0 and std 1.

Registered with timm so it is created by name like every other backbone:
``timm.create_model("paper_cnn", num_classes=11)``.
"""
from __future__ import annotations

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

__all__ = ["PaperCNN"]

default_cfgs = {
    "paper_cnn": dict(
        input_size=(3, 64, 64), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=11,
        first_conv="stages.0.0", classifier="head", license="mit",
    )
}


def conv_stage(in_chs: int, out_chs: int, kernel_size: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(in_chs, out_chs, kernel_size), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class PaperCNN(nn.Module):
    """Four conv stages; features ``[batch, 512, h, w]`` (5x5 at 64 px), stride 8."""

    def __init__(self, num_classes: int = 11, in_chans: int = 3):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stages = nn.Sequential(
            conv_stage(in_chans, widths[0], 3, pool=True),
            conv_stage(widths[0], widths[1], 3, pool=True),
            conv_stage(widths[1], widths[2], 3, pool=True),
            conv_stage(widths[2], widths[3], 2, pool=False),
        )
        reductions = (2, 4, 8, 8)
        self.feature_info = [
            dict(num_chs=chs, reduction=red, module=f"stages.{i}")
            for i, (chs, red) in enumerate(zip(widths, reductions))
        ]
        self.num_features = widths[-1]
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, 3, H, W]`` -> ``[batch, 512, h, w]``."""
        return self.stages(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        intermediates_only: bool = False,
        **_: object,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediates API: outputs of the stages ``indices`` (0..3) and the final map."""
        count = len(self.stages)  # same index rules as timm's (private) feature_take_indices
        if indices is None:
            take_indices = set(range(count))
        elif isinstance(indices, int):
            take_indices = set(range(count - indices, count))
        else:
            take_indices = {i % count for i in indices}
        intermediates = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[batch, 512, h, w]`` -> global average ``[batch, 512]`` (or logits)."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def paper_cnn(pretrained: bool = False, **kwargs) -> PaperCNN:
    """The paper's custom CNN; trained from scratch, no pretrained weights exist."""
    return build_model_with_cfg(PaperCNN, "paper_cnn", pretrained, **kwargs)
