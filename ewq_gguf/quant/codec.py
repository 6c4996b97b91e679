"""The one interface every GGUF type family implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

QuantizeFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
DequantizeFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Codec:
    """Encoder and decoder of one GGUF type.

    quantize(rows float32 (n_rows, n_per_row) contiguous, importance float32 (n_per_row,) or None)
        -> uint8 (n_rows, row_bytes) on the same device, bytes identical to ggml_quantize_chunk.
    dequantize(uint8 (n_rows, row_bytes), n_per_row) -> float32 (n_rows, n_per_row).
    uses_importance: whether ggml's encoder for this type reads an importance vector at all.
    """

    quantize: QuantizeFn
    dequantize: DequantizeFn
    uses_importance: bool
