"""Optimizer parameter groups: head at train.lr, backbone at train.backbone_lr, and layer-wise decay."""
from __future__ import annotations

import pytest
import torch

from metaldefect.config import Config, load_config
from metaldefect.engine.optim import build_optimizer, build_scheduler, parameter_groups
from metaldefect.errors import ConfigError
from metaldefect.models.factory import create_model


def model():
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", "dense", num_classes=3, pretrained=False, input_size=32,
                        head_kwargs={"scales": [1.0], "channels": 16})


def config(**train) -> Config:
    cfg = Config()
    cfg.train.lr, cfg.train.backbone_lr = 1e-3, 1e-4
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def rates(module, groups) -> dict[str, float]:
    """Parameter name -> its group's lr."""
    names = {id(p): name for name, p in module.named_parameters()}
    return {names[id(p)]: group.get("lr") for group in groups for p in group["params"]}


def test_every_trainable_parameter_is_in_exactly_one_group():
    module = model()
    for layer_decay in (None, 0.8):
        groups = parameter_groups(config(layer_decay=layer_decay), module)
        grouped = [id(p) for group in groups for p in group["params"]]
        assert sorted(grouped) == sorted(id(p) for p in module.parameters())


def test_without_layer_decay_the_backbone_trains_at_backbone_lr():
    module = model()
    by_name = rates(module, parameter_groups(config(), module))
    assert {lr for name, lr in by_name.items() if name.startswith("head.")} == {None}  # the optimizer's lr
    assert {lr for name, lr in by_name.items() if name.startswith("backbone.")} == {1e-4}


def test_layer_decay_scales_each_block_geometrically_from_the_last():
    module = model()
    by_name = rates(module, parameter_groups(config(layer_decay=0.5), module))
    depth = len(module.backbone.model.blocks)  # 12
    for i in range(depth):  # block i (from 0) at backbone_lr * 0.5 ** (depth - 1 - i); the last at backbone_lr
        assert by_name[f"backbone.model.blocks.{i}.attn.qkv.weight"] == pytest.approx(1e-4 * 0.5 ** (depth - 1 - i))
    assert by_name["backbone.model.patch_embed.proj.weight"] == pytest.approx(1e-4 * 0.5 ** depth)
    assert by_name["backbone.model.norm.weight"] == pytest.approx(1e-4)
    assert {lr for name, lr in by_name.items() if name.startswith("head.")} == {None}


def test_frozen_parameters_are_left_out_and_the_schedule_keeps_the_decay():
    module = model()
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(not name.startswith("backbone.model.blocks.0."))
    cfg = config(layer_decay=0.5, epochs=4, schedule="cosine", weight_decay=0.05)
    optimizer = build_optimizer(cfg, module)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in module.parameters() if p.requires_grad}
    assert all(group["weight_decay"] == 0.05 for group in optimizer.param_groups)  # on 1-D parameters too
    scheduler = build_scheduler(cfg, optimizer)
    before = [group["lr"] for group in optimizer.param_groups]
    optimizer.step()
    scheduler.step()
    after = [group["lr"] for group in optimizer.param_groups]
    # Cosine over 4 epochs: every group at the same fraction (cos(pi / 4) + 1) / 2 of its own rate.
    assert after == pytest.approx([lr * 0.8535534 for lr in before])


def test_a_frozen_backbone_gives_the_head_group_only():
    module = model()
    module.backbone.requires_grad_(False)
    assert len(parameter_groups(config(layer_decay=0.8), module)) == 1


@pytest.mark.parametrize("value", [0, 1.5, -0.2])
def test_layer_decay_outside_0_to_1_is_a_config_error(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\n")
    with pytest.raises(ConfigError, match="train.layer_decay: must be in"):
        load_config(path, [f"train.layer_decay={value}"])
