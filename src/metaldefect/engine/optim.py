"""The optimizer and learning-rate schedule of a training run (``build_optimizer``, ``build_scheduler``).

Parameter groups: the head's trainable parameters at ``train.lr``; the backbone's at
``train.backbone_lr`` (default ``train.lr``), or, with ``train.layer_decay``, one group per
ViT block whose rate falls geometrically towards the patch embedding (BEiT's layer-wise decay,
grouped by timm's ``param_groups_layer_decay``): later blocks adapt most to the defects,
earlier ones keep more of their pretrained features.
"""
from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from metaldefect.config import Config
from metaldefect.models.backbones import Backbone


def _backbone(module: nn.Module) -> Backbone | None:
    return next((m for m in module.modules() if isinstance(m, Backbone)), None)


def parameter_groups(cfg: Config, module: nn.Module) -> list[dict]:
    """Optimizer parameter groups of ``module``'s trainable parameters (head first, then backbone)."""
    t = cfg.train
    backbone = _backbone(module)
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups = [{"params": [p for p in module.parameters() if p.requires_grad and id(p) not in in_backbone]}]
    backbone_lr = t.backbone_lr or t.lr
    if not any(p.requires_grad for p in (backbone.parameters() if backbone is not None else ())):
        return groups
    if t.layer_decay is None:
        return groups + [{"params": [p for p in backbone.parameters() if p.requires_grad], "lr": backbone_lr}]
    # weight_decay_exclude_1d=False keeps train.weight_decay on every parameter, as without layer decay, so that the
    # decay of the rates is the only change.
    decayed = param_groups_layer_decay(backbone.model, weight_decay=t.weight_decay, layer_decay=t.layer_decay,
                                       weight_decay_exclude_1d=False)
    for group in decayed:
        # torch's schedulers scale each group's own "lr", so timm's lr_scale becomes it here.
        group["lr"] = backbone_lr * group.pop("lr_scale")
    return groups + decayed


def build_optimizer(cfg: Config, module: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``module``'s trainable parameters, grouped by :func:`parameter_groups`."""
    t = cfg.train
    parameters = parameter_groups(cfg, module)
    if t.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(parameters, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: constant, or cosine annealing to 0 over ``train.epochs``."""
    if cfg.train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
