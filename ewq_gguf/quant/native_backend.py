"""Our C encoders (native/, compiled by `pip install` into ewq_gguf.quant._native): quantize()'s fast CPU backend.

ggml's bytes, several times faster than ggml's own encoders per core: native/kernels.h runs the arithmetic of our
torch codecs (ggml's float32 semantics, see ggml_arithmetic.py) for many blocks at once in SIMD lanes, with the order
of operations inside each block unchanged. The module carries one build per instruction set (baseline, AVX2,
AVX-512 on x86-64) and takes the widest the CPU runs; the tests compare every one with ggml.

The extension is optional: where it did not compile (see setup.py) or for a type it does not encode, quantize()
takes ggml's encoders. Threads: the C code releases the GIL and shares nothing between rows, so rows are split over a
small thread pool (chunking.in_row_pieces), as for ggml.

The module also holds the entropy analysis's counting loop (count_patterns): its C code is built here already.
"""
from __future__ import annotations

from typing import Optional

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType

from ..errors import EwqGgufError
from .chunking import in_row_pieces

try:
    from . import _native
except ImportError:  # not built: an install that could not compile it, or a source tree without `pip install -e`
    _native = None

# The types the C code encodes, by ggml's type numbers (native/types.h): gguf-py's enum names them.
TYPES: frozenset[QType] = frozenset(QType(number) for number in _native.TYPES) if _native else frozenset()
# The instruction sets this CPU runs the encoders with, widest (the default) first.
ISAS: tuple[str, ...] = tuple(_native.ISAS) if _native else ()


def available() -> bool:
    """Whether the extension is built and loads."""
    return _native is not None


def quantize(rows: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor] = None,
             threads: Optional[int] = None, isa: Optional[str] = None) -> torch.Tensor:
    """ggml_quantize_chunk's bytes of a 2-D float32 CPU tensor of a type in TYPES: uint8 (n_rows, row_nbytes).

    importance: the imatrix vector (n_per_row values) or None. threads: how many pieces run at once
    (chunking.default_threads() when None). isa: one of ISAS (the widest when None), for tests.
    The caller checks that the row length is a multiple of the type's block size.
    """
    if _native is None:
        raise EwqGgufError("the native quantizer is not built (pip install -e . compiles it)")
    if qtype not in TYPES:
        raise ValueError(f"the native quantizer does not encode {qtype.name}")
    if rows.dim() != 2 or rows.dtype != torch.float32 or rows.device.type != "cpu":
        raise ValueError(f"the native quantizer takes 2-D float32 CPU tensors, got {tuple(rows.shape)} {rows.dtype} "
                         f"{rows.device}")
    rows = rows.contiguous()
    n_rows, n_per_row = rows.shape
    elements, nbytes = GGML_QUANT_SIZES[qtype]
    output = torch.empty((n_rows, n_per_row // elements * nbytes), dtype=torch.uint8)
    weights = 0
    if importance is not None:
        importance = importance.to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        if importance.numel() != n_per_row:
            raise ValueError(f"importance has {importance.numel()} values for rows of {n_per_row}")
        weights = importance.data_ptr()

    def encode(first: int, last: int) -> None:
        _native.encode(int(qtype), rows.data_ptr() + first * n_per_row * rows.element_size(),
                       output.data_ptr() + first * output.shape[1], last - first, n_per_row, weights, isa)

    in_row_pieces(n_rows, threads, encode)
    return output


def count_patterns(values: torch.Tensor) -> torch.Tensor:
    """How often each 16-bit pattern occurs in a 16-bit CPU tensor: int64 counts, index the signed pattern + 32768
    (the entropy analysis's counting pass, analyse/entropy.py)."""
    if _native is None:
        raise EwqGgufError("the native extension is not built (pip install -e . compiles it)")
    if values.element_size() != 2 or values.device.type != "cpu":
        raise ValueError(f"count_patterns takes 16-bit CPU tensors, got {values.dtype} {values.device}")
    values = values.contiguous()
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    _native.count_patterns(values.data_ptr(), values.numel(), counts.data_ptr())
    return counts
