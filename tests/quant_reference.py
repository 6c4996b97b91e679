"""What every encoder test compares: our encoders against ggml's own (ewq_gguf.quant.ggml_backend).

The reference runs on one thread, as a plain call of ggml_quantize_chunk (what llama-quantize does per chunk).
Ours are named explicitly (ENCODERS): the torch codecs on every device torch offers here, and the native encoders in
every instruction set this CPU runs; quantize()'s default would pick one of them, or ggml itself.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch

from ewq_gguf.quant import QType, ggml_backend, native_backend, quantize

# the torch encoders must give the same bytes on every device torch offers here (CUDA where present)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# ours, as "torch-<device>" and "native-<instruction set>"
ENCODERS = [f"torch-{device}" for device in DEVICES] + [f"native-{isa}" for isa in native_backend.ISAS]


def encoder_cases(qtypes) -> list[tuple[QType, str]]:
    """(qtype, encoder) for every encoder of ENCODERS that encodes qtype: the torch codecs all, the native ones
    those of native_backend.TYPES."""
    return [(qtype, encoder) for qtype in qtypes for encoder in ENCODERS
            if encoder.startswith("torch-") or qtype in native_backend.TYPES]


def encoder_bytes(rows: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor], encoder: str) -> torch.Tensor:
    """The bytes of one of ENCODERS for rows (bf16/f16 rows upcast first, as quantize() does)."""
    kind, where = encoder.split("-", 1)
    if kind == "torch":
        return torch_bytes(rows, qtype, importance, where)
    return native_backend.quantize(rows.to(torch.float32), qtype, importance, isa=where)


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
