"""Running an exported graph with onnxruntime, giving the same output dict as the PyTorch model.

:func:`load_onnx` reads ``model.onnx`` and its sidecar ``model.json`` (see
:mod:`metaldefect.inference.onnx_export`) and returns the network as a callable
``images [B, 3, S, S] -> {output name: tensor}`` and the head rebuilt from the sidecar,
whose ``decode`` turns those outputs into detections (its weights are never used).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metaldefect.errors import MetalDefectError
from metaldefect.inference.onnx_export import SIDECAR_FORMAT, SIDECAR_VERSION, sidecar_path
from metaldefect.models.heads import create_head
from metaldefect.models.refiner import refine_boxes

_REQUIRED_KEYS = ("input_name", "output_names", "input_size", "classes", "task", "head", "head_kwargs", "in_dims")


class OnnxNetwork:
    """An onnxruntime session called like the PyTorch model: ``[B, 3, S, S]`` tensor -> dict of tensors."""

    def __init__(self, path: Path, input_name: str, output_names: list[str], threads: int | None = None):
        self.session = _session(path, threads)
        graph_outputs = [output.name for output in self.session.get_outputs()]
        if sorted(graph_outputs) != sorted(output_names):
            raise MetalDefectError(f"{path}: graph outputs {graph_outputs} do not match its sidecar {output_names}")
        self.input_name = input_name
        self.output_names = graph_outputs

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        arrays = self.session.run(self.output_names, {self.input_name: images.numpy().astype(np.float32, copy=False)})
        return {name: torch.from_numpy(array) for name, array in zip(self.output_names, arrays)}


def _session(path: Path, threads: int | None):
    import onnxruntime  # imported here: only the ONNX backend needs it

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads (ONNX Runtime's default) keep the cores busy between runs, starving torch's
    # threads (resize, decode, the refiner's crops) and a second session (the box refiner). With the built-in
    # model on 2 cores, one sample end to end: 116 ms without spinning against 127-134 ms with it, and 126
    # against 273-282 ms with the box refiner (session 11, docs/benchmarks.md "Inference speed").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for damaged files
        raise MetalDefectError(f"{path}: not a readable ONNX model ({error.__class__.__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''})") from None


def read_sidecar(onnx_path: str | Path) -> dict:
    """The sidecar JSON of an exported model, checked; MetalDefectError naming the file otherwise."""
    path = sidecar_path(onnx_path)
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetalDefectError(f"{path}: sidecar metadata of {Path(onnx_path).name} not found "
                               "(export with `metaldefect export` writes it beside the .onnx file)") from None
    except (OSError, ValueError) as error:
        raise MetalDefectError(f"{path}: unreadable sidecar metadata ({error})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise MetalDefectError(f"{path}: not a metaldefect ONNX sidecar (expected \"format\": \"{SIDECAR_FORMAT}\")")
    if sidecar.get("format_version", 0) > SIDECAR_VERSION:
        raise MetalDefectError(f"{path}: sidecar format version {sidecar['format_version']} is newer than "
                               f"this metaldefect reads ({SIDECAR_VERSION}); upgrade metaldefect")
    missing = [key for key in _REQUIRED_KEYS if key not in sidecar]
    if missing:
        raise MetalDefectError(f"{path}: sidecar metadata lacks {', '.join(missing)}")
    return sidecar


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxNetwork, nn.Module, dict]:
    """``(network, head for decoding, sidecar)`` of an exported ``.onnx`` file."""
    path = Path(path)
    if not path.is_file():
        raise MetalDefectError(f"{path}: ONNX model file not found")
    sidecar = read_sidecar(path)
    network = OnnxNetwork(path, sidecar["input_name"], sidecar["output_names"], threads)
    head = create_head(sidecar["head"], sidecar["in_dims"], len(sidecar["classes"]), **sidecar["head_kwargs"]).eval()
    return network, head, sidecar


class OnnxRefiner:
    """A box refiner's exported graph, with :class:`BoxRefiner`'s ``refine``."""

    def __init__(self, path: Path, crop: int, context: float, threads: int | None = None):
        self.session = _session(path, threads)
        self.crop, self.context = int(crop), float(context)

    def __call__(self, crops: torch.Tensor, labels: torch.Tensor, relative_sizes: torch.Tensor) -> torch.Tensor:
        feeds = {"crops": crops.numpy().astype(np.float32, copy=False), "labels": labels.numpy(),
                 "relative_sizes": relative_sizes.numpy().astype(np.float32, copy=False)}
        return torch.from_numpy(self.session.run(["deltas"], feeds)[0])

    def refine(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return refine_boxes(self, self.crop, self.context, image, boxes, labels)


def load_onnx_refiner(onnx_path: str | Path, sidecar: dict, threads: int | None = None) -> OnnxRefiner | None:
    """The refiner exported beside ``onnx_path`` that its sidecar names, or None when it names none."""
    entry = sidecar.get("refiner")
    if not entry:
        return None
    path = Path(onnx_path).parent / entry["file"]
    if not path.is_file():
        raise MetalDefectError(f"{path}: the box refiner named in {sidecar_path(onnx_path).name} is missing "
                               "(export writes it beside the model; copy both, or load with refine=False)")
    return OnnxRefiner(path, entry["crop"], entry["context"], threads)
