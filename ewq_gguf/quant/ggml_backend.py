"""ggml's own encoders through ctypes: quantize()'s fast CPU backend, and the byte-exact reference of the tests.

The library is libggml-base from the llama-cpp-python wheel (llama_cpp/lib/), located without importing llama_cpp,
so loading it costs nothing but the dlopen. Its ggml_quantize_chunk is what llama-quantize itself calls.

ctypes cannot see C declarations: the type numbers and the layout of struct ggml_type_traits are copied from ggml.h
of one llama-cpp-python, while any later one may be installed. So the library is checked when it loads (a few
milliseconds) and refused, with the reason, when it disagrees; the torch encoders then do the work.

Threads: ctypes releases the GIL around each foreign call, and ggml_quantize_chunk over disjoint row ranges shares
no mutable state for the types encoded here (only the IQ1/IQ2/IQ3 grids are global, built once under ggml's lock),
so a chunk of rows is split over a small thread pool (chunking.in_row_pieces) and the pieces run in parallel.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType

from ..errors import EwqGgufError
from .chunking import in_row_pieces

_LIBRARY_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h as of llama-cpp-python 0.3.36; _layout_problem checks it against the loaded
    # library. Only to_float is called.
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
    """Path of libggml-base shipped inside the installed llama_cpp package; EwqGgufError when there is none."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EwqGgufError("llama-cpp-python is not installed: the ggml quantizer needs its libggml-base")
    for location in spec.submodule_search_locations:
        for name in _LIBRARY_NAMES:
            candidate = Path(location) / "lib" / name
            if candidate.exists():
                return candidate
    raise EwqGgufError(f"no libggml-base under {list(spec.submodule_search_locations)}/lib")


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    try:
        library = ctypes.CDLL(str(library_path()))
    except OSError as failure:
        raise EwqGgufError(f"cannot load libggml-base: {failure}") from failure
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    library.ggml_row_size.restype = ctypes.c_size_t
    library.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    library.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    library.ggml_get_type_traits.argtypes = [ctypes.c_int]
    problem = _layout_problem(library)
    if problem:
        raise EwqGgufError(f"the ggml quantizer is unavailable: ewq-gguf does not read the libggml-base of "
                           f"llama-cpp-python {_llama_cpp_version()} right ({problem})")
    return library


def _llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


# Row length of the round trip: whole blocks of every type we encode.
_CHECK_ROW = 256


def _layout_problem(library: ctypes.CDLL) -> Optional[str]:
    """What disagrees between the library and what this module assumes, for every type we encode; None if nothing.

    The integers of ggml_type_traits are compared with gguf-py's block table and the name with the type's (which
    also proves ggml's type numbers), before the name pointer is read or to_float is called; then one row encoded by
    ggml and decoded by the struct's to_float must give our decoder's values."""
    from . import CODECS, dequantize    # this module is imported by the package before its codec table exists

    for qtype in CODECS:
        traits = library.ggml_get_type_traits(int(qtype)).contents
        sizes, expected = (traits.blck_size, traits.type_size), GGML_QUANT_SIZES[qtype]
        if sizes != expected or library.ggml_row_size(int(qtype), sizes[0]) != sizes[1]:
            return (f"{qtype.name}: blocks of {sizes[0]} elements in {sizes[1]} bytes, expected {expected[0]} in "
                    f"{expected[1]}")
        name = (traits.type_name or b"").decode(errors="replace")
        if name.upper() != qtype.name:
            return f"type {int(qtype)} is named '{name}', expected {qtype.name}"
        if qtype == QType.F32:
            continue    # ggml has no to_float for F32
        if not traits.to_float:
            return f"{qtype.name} has no to_float"
        row = torch.sin(torch.arange(_CHECK_ROW, dtype=torch.float32) * 0.37)
        # room for a float row: a misplaced pointer that is really an encoder reads that much from `packed`
        packed = torch.zeros(4 * _CHECK_ROW, dtype=torch.uint8)
        library.ggml_quantize_chunk(int(qtype), row.data_ptr(), packed.data_ptr(), 0, 1, _CHECK_ROW, None)
        theirs = torch.empty((1, _CHECK_ROW), dtype=torch.float32)
        _TO_FLOAT(traits.to_float)(packed.data_ptr(), theirs.data_ptr(), _CHECK_ROW)
        encoded = packed[:_CHECK_ROW // sizes[0] * sizes[1]].reshape(1, -1)
        if not torch.equal(theirs, dequantize(encoded, qtype, _CHECK_ROW)):
            return f"ggml's to_float of {qtype.name} does not decode what its encoder wrote as our decoder does"
    return None


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether libggml-base is installed, loads and reads as this module expects (checked once)."""
    try:
        _library()
    except EwqGgufError:
        return False
    return True


def row_nbytes(qtype: QType, n_per_row: int) -> int:
    """ggml_row_size: bytes of one row of n_per_row elements."""
    return int(_library().ggml_row_size(int(qtype), n_per_row))


def quantize(rows: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor] = None,
             threads: Optional[int] = None) -> torch.Tensor:
    """ggml_quantize_chunk over all rows of a 2-D float32 CPU tensor; returns uint8 (n_rows, row_nbytes).

    importance: the imatrix vector (n_per_row float32 values) or None, passed through unchanged: ggml decides per
    type whether it reads it. threads: how many pieces run at once (chunking.default_threads() when None).
    The caller checks that the row length is a multiple of the type's block size (ggml aborts the process if not).
    """
    if rows.dim() != 2 or rows.dtype != torch.float32 or rows.device.type != "cpu":
        raise ValueError(f"ggml quantizes 2-D float32 CPU tensors, got {tuple(rows.shape)} {rows.dtype} {rows.device}")
    rows = rows.contiguous()
    n_rows, n_per_row = rows.shape
    output = torch.empty((n_rows, row_nbytes(qtype, n_per_row)), dtype=torch.uint8)
    weights = None
    if importance is not None:
        importance = importance.to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        if importance.numel() != n_per_row:
            raise ValueError(f"importance has {importance.numel()} values for rows of {n_per_row}")
        weights = importance.data_ptr()
    library = _library()

    def encode(first: int, last: int) -> None:
        written = library.ggml_quantize_chunk(
            int(qtype), rows.data_ptr(), output.data_ptr(), first * n_per_row, last - first, n_per_row, weights,
        )
        if written != (last - first) * output.shape[1]:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for rows {first}..{last} of {qtype.name}")

    in_row_pieces(n_rows, threads, encode)
    return output


def dequantize(data: torch.Tensor, qtype: QType, n_per_row: int) -> torch.Tensor:
    """ggml's to_float of qtype over uint8 (n_rows, row_nbytes) CPU bytes; returns float32 (n_rows, n_per_row)."""
    packed = data.to(device="cpu", dtype=torch.uint8).contiguous()
    n_rows = packed.numel() // row_nbytes(qtype, n_per_row)
    traits = _library().ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise ValueError(f"ggml has no decoder for {qtype.name}")
    output = torch.empty((n_rows, n_per_row), dtype=torch.float32)
    _TO_FLOAT(traits.to_float)(packed.data_ptr(), output.data_ptr(), n_rows * n_per_row)
    return output
