"""What every encoder test compares: our torch encoders against ggml's own (ewq_gguf.quant.ggml_backend).

The reference runs on one thread, as a plain call of ggml_quantize_chunk (what llama-quantize does per chunk).
Ours is always asked for the torch backend explicitly: quantize()'s default would pick ggml on the CPU and compare
ggml with itself.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch

from ewq_gguf.quant import QType, ggml_backend, quantize

# the torch encoders must give the same bytes on every device torch offers here (CUDA where present)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

requires_ggml = pytest.mark.skipif(not ggml_backend.available(), reason="llama-cpp-python's libggml-base is missing")


def torch_bytes(rows: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor] = None,
                device: str = "cpu") -> torch.Tensor:
    """Our torch encoder's bytes for rows, computed on device."""
    on_device = None if importance is None else importance.to(device)
    return quantize(rows.to(device), qtype, on_device, backend="torch")


def reference_bytes(rows: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ggml_quantize_chunk's bytes for float32 rows (bf16/f16 rows upcast first, as llama.cpp does)."""
    return ggml_backend.quantize(rows.to(torch.float32), qtype, importance, threads=1)


def assert_same_bytes(ours: torch.Tensor, expected: torch.Tensor) -> None:
    ours, expected = ours.cpu().numpy(), expected.cpu().numpy()
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    differing = np.argwhere(ours != expected)
    assert differing.size == 0, f"{len(differing)} bytes differ, first at (row, byte) {differing[:5].tolist()}"
