"""F32, F16 and BF16: a rounding cast (round to nearest even), as ggml's converters do."""
from __future__ import annotations

from typing import Optional

import torch
from gguf import GGMLQuantizationType as QType

from .codec import Codec


def _codec(dtype: torch.dtype) -> Codec:
    def quantize(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
        return rows.to(dtype).contiguous().view(torch.uint8)

    def dequantize(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
        return data.contiguous().view(dtype).to(torch.float32).reshape(-1, n_per_row)

    return Codec(quantize, dequantize, uses_importance=False)


CODECS = {QType.F32: _codec(torch.float32), QType.F16: _codec(torch.float16), QType.BF16: _codec(torch.bfloat16)}
