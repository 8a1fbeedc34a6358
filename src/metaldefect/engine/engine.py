"""One epoch of training, and evaluation (DETR style), for any head obeying the heads contract.

``model`` is either a head (frozen backbone: the loader yields ``(features dict, targets)``
from the feature cache) or a :class:`DefectModel` (end to end: the loader yields
``(images [B, 3, S, S], targets)``), possibly wrapped in DistributedDataParallel. Either
way ``model(inputs)`` gives the head's outputs, and the head scores them.
"""
from __future__ import annotations

import math

import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from metaldefect.engine.metrics import ConfusionMatrix, MetricSums
from metaldefect.engine.precision import autocast, to_float32
from metaldefect.engine.val_map import DetectionCollector
from metaldefect.errors import MetalDefectError


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def head_of(model: nn.Module) -> nn.Module:
    """The head that scores the outputs: the model itself, or a DefectModel's ``.head``."""
    module = unwrap(model)
    return getattr(module, "head", module)


def to_device(inputs, device: torch.device, memory_format: torch.memory_format = torch.preserve_format):
    """Move an image batch, or a features dict of tensors (and lists of tensors), to ``device``;
    4-d tensors (images, feature maps) in ``memory_format``."""
    if isinstance(inputs, torch.Tensor):
        layout = memory_format if inputs.dim() == 4 else torch.preserve_format
        return inputs.to(device, non_blocking=True, memory_format=layout)
    if isinstance(inputs, dict):
        return {key: to_device(value, device, memory_format) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [to_device(value, device, memory_format) for value in inputs]
    return inputs


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epoch: int,
                    device: torch.device, grad_clip: float = 0.0, progress: bool = True,
                    ema: ModelEmaV3 | None = None, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Train for one pass over ``loader``; return the epoch's mean losses and metrics (all processes).

    Metrics are computed on the training batches as they go (dropout and augmentation on),
    as Keras reports them in the paper's curves. ``ema``, when given, is updated after every
    step; its warm-up counts steps from the first epoch, so a resumed run continues it exactly.
    ``dtype``: the forward pass runs under autocast to it (bf16), the loss in float32. Inputs go
    channels-last: with the model's weights channels-last too (``train`` does that), a bf16 step
    of the dense head took 0.35 s against 0.43 s in one timing on this project's CPU.
    """
    model.train()
    head = head_of(model)
    sums = MetricSums()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress, dynamic_ncols=True)
    for step, (inputs, targets) in enumerate(bar, start=(epoch - 1) * len(loader) + 1):
        inputs = to_device(inputs, device, torch.channels_last)
        with autocast(dtype, device):
            outputs = model(inputs)
        outputs = to_float32(outputs)
        losses = head.loss(outputs, targets)
        loss = losses["loss"]
        if not math.isfinite(loss.item()):
            raise MetalDefectError(f"epoch {epoch}: the training loss became {loss.item()}; "
                                   "lower train.lr or set train.grad_clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(unwrap(model), step=step)
        sums.add_losses({name: value.detach() for name, value in losses.items()}, _batch_size(inputs))
        sums.add(head.metrics(outputs, targets))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return sums.all_reduce().means()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_labels: int | None = None,
             progress: bool = True, desc: str = "val", dtype: torch.dtype = torch.float32
             ) -> tuple[dict[str, float], torch.Tensor | None]:
    """Mean losses and metrics over ``loader`` (all processes), and the confusion matrix.

    ``num_labels`` sizes the confusion matrix (classes + 1 for "no defect"); it is None
    when not wanted or when the head has no ``confusion`` method. Detecting heads also get
    COCO ``map50`` and ``map`` over the whole loader (see :mod:`metaldefect.engine.val_map`).
    ``dtype``: the forward pass runs under autocast to it, as in :func:`train_one_epoch`; losses, metrics and
    decoding in float32. The val pass of a bf16 run's epochs uses it (NEU-DET's val split: 2.6-3.0 s against
    4.6-6.3 s in float32 in one set of timings, val mAP within 0.002 of float32's; docs/benchmarks.md, session
    16); a run's final scores are float32, as the product predicts.
    """
    model = unwrap(model)  # no DDP collectives in evaluation: shards may differ in length
    model.eval()
    head = head_of(model)
    sums = MetricSums()
    confusion = ConfusionMatrix(num_labels) if num_labels and hasattr(head, "confusion") else None
    detections = DetectionCollector(head) if head.task == "detect" else None
    for inputs, targets in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        inputs = to_device(inputs, device)
        with autocast(dtype, device):
            outputs = model(inputs)
        outputs = to_float32(outputs)
        sums.add_losses(head.loss(outputs, targets), _batch_size(inputs))
        sums.add(head.metrics(outputs, targets))
        if confusion is not None:
            confusion.update(*head.confusion(outputs, targets))
        if detections is not None:
            detections.add(outputs, targets)
    matrix = confusion.all_reduce().matrix if confusion is not None else None
    means = sums.all_reduce().means()
    if detections is not None:
        means.update(detections.result())
    return means, matrix
