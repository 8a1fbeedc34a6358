"""ONNX export: backbone and head in one graph, plus a sidecar JSON to decode its outputs.

The graph takes ``images`` ``[batch, 3, S, S]`` float32 in [0, 1] (normalisation is inside
the backbone) and returns the head's raw outputs, one graph output per key of the
head's output dict (for the dense head: ``box_ltrb``, ``cls_logits``, ``points``,
``quality_logits``, ``ranges``, ``strides``), every one with a dynamic batch axis.
Decoding (score threshold, box scaling, NMS) is *not* in the graph: the onnxruntime
predictor rebuilds the head from the sidecar and calls the head's own ``decode`` on the
graph's outputs, so both backends share one decoding code path.

A model with a box refiner (:mod:`metaldefect.models.refiner`) gets its network as a second
graph, ``<name>.refiner.onnx``; the boxes are cropped in torch, as they are decoded.

Sidecar ``<name>.json`` beside ``<name>.onnx``::

    {"format": "metaldefect-onnx", "format_version": 1, "input_name": "images",
     "output_names": [...], "input_size": S, "classes": [...], "task": "detect",
     "head": "dense", "head_kwargs": {...}, "in_dims": {...}, "opset": 18, "card": {...},
     "refiner": {"file": "<name>.refiner.onnx", "crop": 48, "context": 2.0}}   (with a refiner only)
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from metaldefect.atomic import atomic_path, write_text
from metaldefect.errors import MetalDefectError
from metaldefect.models.factory import DefectModel
from metaldefect.models.refiner import BoxRefiner

SIDECAR_FORMAT = "metaldefect-onnx"
SIDECAR_VERSION = 1
INPUT_NAME = "images"
REFINER_INPUTS = ("crops", "labels", "relative_sizes")
DEFAULT_OPSET = 18  # the first opset the torch.export-based exporter translates natively


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


class _TupleOutputs(nn.Module):
    """The model with its output dict flattened to a tuple in ``names`` order (ONNX outputs are positional)."""

    def __init__(self, model: DefectModel, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        return tuple(outputs[name] for name in self.names)


def refiner_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.refiner.onnx``."""
    return Path(onnx_path).with_suffix(".refiner.onnx")


def export_onnx(model: DefectModel, classes: list[str], spec: dict, out_path: str | Path, card: dict | None = None,
                opset: int = DEFAULT_OPSET, refiner: BoxRefiner | None = None) -> Path:
    """Write ``model`` as one ONNX graph to ``out_path`` and its sidecar JSON beside it.

    Args:
        model: the backbone + head, in eval mode, on the CPU.
        classes: the class vocabulary, in index order.
        spec: the ``create_model`` keyword arguments the model was built with (head name and kwargs).
        card: the model card, copied into the sidecar.
        opset: ONNX opset (>= 17).
        refiner: the model's box refiner, if any: its network goes to ``<name>.refiner.onnx``
            (inputs ``crops``, ``labels``, ``relative_sizes``; output ``deltas``), and the sidecar
            names the file with the crop size and context the cropping needs.
    """
    if opset < 17:
        raise MetalDefectError(f"ONNX opset {opset}: 17 or newer is needed")
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise MetalDefectError(f"{out_path}: the exported file must end in .onnx")
    model = model.cpu().eval()
    size = model.backbone.input_size
    example = torch.rand(2, 3, size, size)
    with torch.inference_mode():
        names = sorted(name for name, value in model(example).items() if isinstance(value, torch.Tensor))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(_TupleOutputs(model, names), (example,), str(tmp), input_names=[INPUT_NAME],
                              output_names=names, opset_version=opset, dynamic_shapes=({0: batch},),
                              external_data=False, dynamo=True, verbose=False)
        except Exception as error:  # the exporter raises many types; name the model and stop cleanly
            raise MetalDefectError(f"{out_path}: ONNX export failed ({error.__class__.__name__}: "
                                   f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if refiner is not None:
        _export_refiner(refiner, refiner_path(out_path), opset)
    sidecar = {
        "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
        "input_name": INPUT_NAME, "output_names": names, "input_size": size,
        "classes": list(classes), "task": model.task,
        "head": spec["head_name"], "head_kwargs": spec.get("head_kwargs") or {},
        "in_dims": model.in_dims, "opset": opset, "card": card or {},
        **({"refiner": {"file": refiner_path(out_path).name, "crop": refiner.crop, "context": refiner.context}}
           if refiner is not None else {}),
    }
    write_text(sidecar_path(out_path), json.dumps(sidecar, indent=2) + "\n")
    return out_path


def _export_refiner(refiner: BoxRefiner, path: Path, opset: int) -> None:
    """The refiner's network as an ONNX graph with a dynamic number of boxes."""
    refiner = refiner.cpu().eval()
    crops = torch.rand(3, 1, refiner.crop, refiner.crop)
    example = (crops, torch.zeros(3, dtype=torch.long), torch.full((3, 2), 0.5))
    boxes = torch.export.Dim("boxes", min=1, max=100_000)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(refiner, example, str(tmp), input_names=list(REFINER_INPUTS), output_names=["deltas"],
                              opset_version=opset, dynamic_shapes=({0: boxes}, {0: boxes}, {0: boxes}),
                              external_data=False, dynamo=True, verbose=False)
        except Exception as error:  # as for the model above
            raise MetalDefectError(f"{path}: ONNX export of the box refiner failed ({error.__class__.__name__}: "
                                   f"{str(error).splitlines()[0] if str(error) else ''})") from None
