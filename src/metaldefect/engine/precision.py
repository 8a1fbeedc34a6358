"""The arithmetic of training and inference: float32, or bfloat16 autocast where the CPU computes it natively.

On a CPU with AMX (or AVX512-BF16), bf16 autocast made the box refiner's training 1.6 times
faster, a dense head's training step 1.4 times and feature extraction 2.9 times (docs/benchmarks.md,
sessions 12 and 13), and the built-in model's inference 1.25 times at batch 1 (session 18); elsewhere bf16
is emulated and slower, so ``"auto"`` picks it only where it is native.
Losses, optimiser weights and saved models stay float32: autocast only lowers the precision of
the operations it covers.
"""
from __future__ import annotations

import contextlib

import torch

from metaldefect.errors import MetalDefectError

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX tiles or AVX512-BF16); elsewhere it is emulated, slower."""
    # torch.cpu's feature probes are private, so a torch without them counts as "no".
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe is not None and probe() for probe in probes)


def training_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``torch.bfloat16`` or ``torch.float32`` for ``precision`` (one of :data:`PRECISIONS`) on ``device``.

    ``"auto"`` is bf16 on a CPU that computes it natively, float32 elsewhere (GPUs included: there,
    float16 autocast would be the usual choice, and nothing here has measured it).
    """
    if precision not in PRECISIONS:
        raise MetalDefectError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cpu" and native_bf16() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(dtype: torch.dtype, device: torch.device | str = "cpu"):
    """A context that runs the ops autocast covers in ``dtype``; a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def to_float32(outputs):
    """A head's outputs (a tensor, or dicts and lists of them) with floating tensors in float32,
    so that losses, metrics and decoding run in full precision after an autocast forward pass."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(value) for value in outputs)
    return outputs


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` / ``"float32"``: how runs and summaries record the precision used."""
    return str(dtype).removeprefix("torch.")
