"""QUANTIZE: tensors in, GGUF bytes out, on whatever torch device the rows live on.

Pure by design: this package knows no file, model or plan. One codec module per type family (floats, legacy,
kquants_affine, kquants_symmetric, iq4, mxfp4) registers its encoders in ``CODECS``; they share ggml_arithmetic
(float32 as ggml's C code computes it), scale_search (ggml's scale searches), packing (block fields as bytes) and
chunking (how rows are cut). Everything else (sizes, which type a row length can hold, llama.cpp's fallback rule) is
derived here from gguf-py's block table so that planners can ask for sizes without producing bytes, and so is the
menu of types planners choose from (planner_types: MXFP4 for expert tensors only, as llama.cpp's mixes do).

Every backend gives the same bytes: "torch" (our codecs, any device), "native" (our C encoders, CPU only, several
threads, for the types in native_backend.TYPES; see native_backend) and "ggml" (llama.cpp's own encoders through
ctypes, CPU only, several threads; see ggml_backend). "auto" takes, for CPU rows, the native encoders where they are
built and cover the type, else ggml's when its library loads; on CUDA it takes the fused Triton kernels of
triton_kernels for the types they cover, when triton is importable (it is no dependency; the module is imported on
first CUDA use only), and the torch codecs otherwise.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType

from ..errors import EwqGgufError
from . import floats, ggml_backend, iq4, kquants_affine, kquants_symmetric, legacy, mxfp4, native_backend
from .codec import Codec
from .fallback import effective_type


CODECS: dict[QType, Codec] = {}
for _family in (floats, legacy, kquants_affine, kquants_symmetric, iq4, mxfp4):
    CODECS.update(_family.CODECS)

BACKENDS = ("auto", "torch", "native", "ggml")

__all__ = [
    "QType", "Codec", "CODECS", "BACKENDS", "quantize", "dequantize", "row_nbytes", "tensor_nbytes", "can_hold",
    "parse_type", "effective_type", "supported_names", "EXPERT_TYPES", "is_expert_tensor", "planner_types",
]

# llama.cpp's own mixes give MXFP4 to expert tensors only: llama-quantize's MXFP4_MOE stores tensors with ne[2] > 1
# (the experts of a layer stacked in one tensor) in MXFP4 and the others in Q8_0 (llama_tensor_get_type_impl in
# src/llama-quant.cpp). Any tensor can hold it (llama-quantize --pure and --tensor-type write it anywhere, and so do
# --type and plans here), so it is no fallback rule: only the menus that planners choose from on their own follow it.
EXPERT_TYPES = frozenset({QType.MXFP4})


def supported_names() -> str:
    """The types we encode, for messages: 'BF16, F16, ...'."""
    return ", ".join(sorted(t.name for t in CODECS))


def parse_type(name: str) -> QType:
    """GGUF type from its llama.cpp name (case-insensitive); ValueError names the supported ones."""
    key = name.strip().upper()
    for qtype in CODECS:
        if qtype.name == key:
            return qtype
    raise ValueError(f"unsupported tensor type '{name}' (supported: {supported_names()})")


def is_expert_tensor(shape: tuple[int, ...]) -> bool:
    """Whether a tensor of this shape (numpy order, last dimension = row) stacks experts: ggml's ne[2] > 1."""
    return len(shape) >= 3 and shape[-3] > 1


def planner_types(shape: tuple[int, ...]) -> tuple[QType, ...]:
    """The types a planner chooses among by default for a tensor of this shape: every type we encode, the
    EXPERT_TYPES for expert tensors only."""
    return tuple(qtype for qtype in CODECS if qtype not in EXPERT_TYPES or is_expert_tensor(shape))


def block_shape(qtype: QType) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF type."""
    return GGML_QUANT_SIZES[qtype]


def can_hold(qtype: QType, n_per_row: int) -> bool:
    """Whether rows of n_per_row elements can be stored in qtype (row length a multiple of the block size)."""
    return n_per_row % block_shape(qtype)[0] == 0


def row_nbytes(qtype: QType, n_per_row: int) -> int:
    elements, nbytes = block_shape(qtype)
    if n_per_row % elements:
        raise ValueError(f"{qtype.name} cannot hold rows of {n_per_row} elements (block size {elements})")
    return n_per_row // elements * nbytes


def tensor_nbytes(qtype: QType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of the given shape (numpy order, last dimension = row) stored in qtype."""
    n_rows = 1
    for dim in shape[:-1]:
        n_rows *= dim
    return n_rows * row_nbytes(qtype, shape[-1])


def quantize(rows: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor] = None, backend: str = "auto",
             threads: Optional[int] = None) -> torch.Tensor:
    """Encode a 2-D float tensor row by row into qtype; returns uint8 (n_rows, row_nbytes) on the same device.

    importance: optional per-column weights (llama.cpp's imatrix meaning), used only by types whose ggml encoder
    uses them. Rows in bf16/f16 are upcast to float32 first, as llama.cpp does before quantizing.
    backend: one of BACKENDS (see the module's notes; every one gives the same bytes). F32/F16/BF16 are plain casts,
    done by torch whatever the backend. threads: the native and ggml backends' threads (all CPUs of the process
    when None); torch uses its own setting.
    All-finite input is the caller's contract (write.encode.encode_tensor checks it once, on the stored dtype).
    """
    if rows.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(rows.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantizer backend '{backend}' (one of {', '.join(BACKENDS)})")
    codec = CODECS.get(qtype)
    if codec is None:
        raise ValueError(f"no encoder for {qtype.name}")
    row_nbytes(qtype, rows.shape[1])
    if qtype in floats.CODECS:
        # cast straight from the stored dtype (exact: bf16/f16 -> f32 -> bf16/f16 is the identity)
        return codec.quantize(rows.contiguous(), None)
    cpu_backend = _cpu_backend(backend, rows.device, qtype)
    rows = rows.to(torch.float32).contiguous()
    if importance is not None:
        if importance.numel() != rows.shape[1]:
            raise ValueError(f"importance has {importance.numel()} values for rows of {rows.shape[1]}")
        importance = importance.to(rows.device, torch.float32).contiguous() if codec.uses_importance else None
    if cpu_backend is not None:
        return cpu_backend.quantize(rows, qtype, importance, threads)
    if backend == "auto":
        kernels = _fused_kernels(rows.device, qtype)
        if kernels is not None:
            encoded = kernels.quantize(rows, qtype, importance)
            if encoded is not None:  # None: input outside what the kernels match (non-finite values)
                return encoded
    return codec.quantize(rows, importance)


def _cpu_backend(backend: str, device: torch.device, qtype: QType):
    """native_backend or ggml_backend where one of them encodes rows of qtype on device, None for the torch codecs
    (and the Triton kernels)."""
    if backend == "torch":
        return None
    if backend == "auto":
        if device.type != "cpu":
            return None
        if native_backend.available() and qtype in native_backend.TYPES:
            return native_backend
        return ggml_backend if ggml_backend.available() else None
    if device.type != "cpu":
        raise EwqGgufError(f"the {backend} quantizer runs on the CPU only, not on {device} (use the torch quantizer)")
    # a missing library or type raises in the backend, saying why
    return native_backend if backend == "native" else ggml_backend


def _fused_kernels(device: torch.device, qtype: QType):
    """The triton_kernels module when it encodes qtype on device (CUDA, triton importable), else None."""
    if device.type != "cuda":
        return None
    kernels = _triton_kernels()
    return kernels if kernels is not None and qtype in kernels.TYPES else None


@lru_cache(maxsize=1)
def _triton_kernels():
    try:
        from . import triton_kernels
    except ImportError:  # no triton, or one too old: the torch codecs encode on CUDA too
        return None
    return triton_kernels


def dequantize(data: torch.Tensor, qtype: QType, n_per_row: int) -> torch.Tensor:
    """Decode uint8 (n_rows, row_nbytes) of qtype back to float32 (n_rows, n_per_row)."""
    codec = CODECS.get(qtype)
    if codec is None:
        raise ValueError(f"no decoder for {qtype.name}")
    return codec.dequantize(data.reshape(-1, row_nbytes(qtype, n_per_row)), n_per_row)
