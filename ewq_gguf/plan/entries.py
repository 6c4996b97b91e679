"""Turning one decision (tensor spec + requested type + reason) into a plan entry with its real type and size."""
from __future__ import annotations

from gguf import GGMLQuantizationType as QType

from ..quant import effective_type, tensor_nbytes
from ..source.model import TensorSpec
from .plan import PlanEntry

VECTOR_TYPE = QType.F32


def entry_for(spec: TensorSpec, requested: QType, reason: str) -> PlanEntry:
    """Plan entry for a tensor: 1-D tensors and those llama.cpp keeps in float (routers, convolutions) stay F32;
    others get `requested` or llama.cpp's fallback for it."""
    if spec.keeps_float:
        requested, reason = VECTOR_TYPE, "llama.cpp keeps it in F32"
    elif not spec.is_matrix:
        requested, reason = VECTOR_TYPE, "1-D tensors stay F32"
    effective = effective_type(requested, spec.shape[-1])
    return PlanEntry(name=spec.name, shape=tuple(spec.shape), requested=requested, type=effective,
                     nbytes=tensor_nbytes(effective, spec.shape), block=spec.block, reason=reason)
