"""Training arithmetic: the precision names, autocast, and bf16 training steps that keep float32 weights."""
from __future__ import annotations

import pytest
import torch

from metaldefect.config import CHOICES
from metaldefect.engine import precision
from metaldefect.engine.precision import autocast, dtype_name, training_dtype
from metaldefect.errors import MetalDefectError


def test_precision_names_map_to_dtypes_and_unknown_ones_are_refused():
    assert training_dtype("fp32") == torch.float32 and training_dtype("bf16") == torch.bfloat16
    assert training_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(MetalDefectError, match="precision must be one of auto, fp32, bf16"):
        training_dtype("fp16")
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float32) == "float32"
    assert CHOICES["train.precision"] == precision.PRECISIONS  # what a config may ask for (config stays torch-free)


def test_auto_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert training_dtype("auto") == torch.bfloat16
    assert training_dtype("auto", "cuda") == torch.float32  # GPUs: nothing measured, so float32
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert training_dtype("auto") == torch.float32
    assert training_dtype("bf16") == torch.bfloat16  # asked for explicitly: emulated, but honoured


def test_autocast_lowers_matrix_products_only_for_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.float32):
        assert (a @ b).dtype == torch.float32
