"""llama-quantize's rule for a row length that a type's block size does not divide (tensor_type_fallback).

Facts from src/llama-quant.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors: a 256-block type is replaced
by a fixed 32-block type; a type whose block is already 32 or smaller stays; if the result still does not divide the
row length the tensor is stored as F16. A larger-block type without a listed substitute is an error there too.
"""
from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType

# The substitutes llama-quantize uses when the row length is not a multiple of the requested type's block.
_SUBSTITUTE: dict[QType, QType] = {
    QType.IQ1_S: QType.IQ4_NL,
    QType.IQ1_M: QType.IQ4_NL,
    QType.IQ2_XXS: QType.IQ4_NL,
    QType.IQ2_XS: QType.IQ4_NL,
    QType.IQ2_S: QType.IQ4_NL,
    QType.IQ3_XXS: QType.IQ4_NL,
    QType.IQ3_S: QType.IQ4_NL,
    QType.IQ4_XS: QType.IQ4_NL,
    QType.Q2_K: QType.Q4_0,
    QType.Q3_K: QType.Q4_0,
    QType.TQ1_0: QType.Q4_0,
    QType.TQ2_0: QType.Q4_0,
    QType.Q4_K: QType.Q5_0,
    QType.Q5_K: QType.Q5_1,
    QType.Q6_K: QType.Q8_0,
}

_LAST_RESORT = QType.F16


def _fits(qtype: QType, n_per_row: int) -> bool:
    return n_per_row % GGML_QUANT_SIZES[qtype][0] == 0


def effective_type(requested: QType, n_per_row: int) -> QType:
    """The type llama-quantize actually writes for rows of n_per_row elements when requested is asked for.

    Raises ValueError where llama-quantize aborts: a type with blocks over 32 that has no substitute.
    """
    if _fits(requested, n_per_row):
        return requested
    if requested in _SUBSTITUTE:
        substitute = _SUBSTITUTE[requested]
    elif GGML_QUANT_SIZES[requested][0] <= 32:
        substitute = requested
    else:
        raise ValueError(f"llama.cpp defines no fallback for {requested.name} (rows of {n_per_row} elements)")
    return substitute if _fits(substitute, n_per_row) else _LAST_RESORT
