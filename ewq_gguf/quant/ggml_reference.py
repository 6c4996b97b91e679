"""ggml's own encoders and decoders through ctypes: the byte-exact reference our torch codecs are tested against.

The library is libggml-base from the llama-cpp-python wheel (llama_cpp/lib/). It is located without importing
llama_cpp, so loading it costs nothing but the dlopen. Used by tests and benchmarks, never by the conversion path.
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType

from ..errors import EwqGgufError

_LIBRARY_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h; only to_float is called.
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def library_path() -> Path:
    """Path of libggml-base shipped inside the installed llama_cpp package."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EwqGgufError("llama-cpp-python is not installed: the ggml reference quantizer needs its libggml-base")
    for location in spec.submodule_search_locations:
        for name in _LIBRARY_NAMES:
            candidate = Path(location) / "lib" / name
            if candidate.exists():
                return candidate
    raise EwqGgufError(f"no libggml-base under {list(spec.submodule_search_locations)}/lib")


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    library = ctypes.CDLL(str(library_path()))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    library.ggml_row_size.restype = ctypes.c_size_t
    library.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    library.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    library.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return library


def reference_row_nbytes(qtype: QType, n_per_row: int) -> int:
    """ggml_row_size: bytes of one row of n_per_row elements."""
    return int(_library().ggml_row_size(int(qtype), n_per_row))


def reference_quantize(rows: np.ndarray, qtype: QType, importance: Optional[np.ndarray] = None) -> np.ndarray:
    """ggml_quantize_chunk over all rows of a 2-D float32 array; returns uint8 (n_rows, row_nbytes).

    importance is the imatrix vector (one weight per column) or None, passed through unchanged.
    """
    source = np.ascontiguousarray(rows, dtype=np.float32)
    if source.ndim != 2:
        raise ValueError(f"reference_quantize expects a 2-D array, got shape {source.shape}")
    n_rows, n_per_row = source.shape
    block_elements = GGML_QUANT_SIZES[qtype][0]
    if n_per_row % block_elements:
        raise ValueError(f"{qtype.name} cannot hold rows of {n_per_row} elements (block size {block_elements})")
    row_nbytes = reference_row_nbytes(qtype, n_per_row)
    output = np.zeros((n_rows, row_nbytes), dtype=np.uint8)
    weights = None
    if importance is not None:
        weights = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if weights.size != n_per_row:
            raise ValueError(f"importance has {weights.size} values for rows of {n_per_row}")
    written = _library().ggml_quantize_chunk(
        int(qtype), source.ctypes.data, output.ctypes.data, 0, n_rows, n_per_row,
        None if weights is None else weights.ctypes.data,
    )
    if written != output.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {output.nbytes}")
    return output


def reference_dequantize(data: np.ndarray, qtype: QType, n_per_row: int) -> np.ndarray:
    """ggml's to_float of qtype over uint8 (n_rows, row_nbytes); returns float32 (n_rows, n_per_row)."""
    packed = np.ascontiguousarray(data, dtype=np.uint8)
    row_nbytes = reference_row_nbytes(qtype, n_per_row)
    n_rows = packed.size // row_nbytes
    traits = _library().ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise ValueError(f"ggml has no decoder for {qtype.name}")
    output = np.zeros((n_rows, n_per_row), dtype=np.float32)
    _TO_FLOAT(traits.to_float)(packed.ctypes.data, output.ctypes.data, n_rows * n_per_row)
    return output
