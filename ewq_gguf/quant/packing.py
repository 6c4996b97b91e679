"""ggml's block fields as bytes: little-endian fp16 and integers, nibble pairs and bit planes, as uint8 tensors."""
from __future__ import annotations

import torch

from .ggml_arithmetic import low_byte, to_fp16


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of ggml's fp16 of each value: shape (..., 2) uint8."""
    return to_fp16(values).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def int_bytes(values: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Little-endian bytes of the low nbytes*8 bits of an integer tensor: shape (..., nbytes) uint8."""
    wide = values.to(torch.int64)
    return torch.stack([low_byte(wide >> (8 * i)) for i in range(nbytes)], dim=-1)


def pack_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """One byte per pair: low | high << 4 (each a 4-bit code; higher bits of low are masked off)."""
    return ((low.to(torch.int32) & 0x0F) | ((high.to(torch.int32) & 0x0F) << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles over the last dimension: (..., n) bytes -> (..., 2n) int32 codes, the low nibbles
    first (elements 0..n-1 of ggml's 32-value blocks), then the high ones (elements n..2n-1)."""
    codes = packed.to(torch.int32)
    return torch.cat([codes & 0x0F, codes >> 4], dim=-1)


def pack_high_bits(codes: torch.Tensor, bit: int = 4) -> torch.Tensor:
    """Bit `bit` of each of the last dimension's codes, gathered into a little-endian bit field of (..., n/8) bytes.

    Element j lands in bit j % 8 of byte j // 8, the layout of Q5_0/Q5_1's qh (a uint32 read little-endian).
    """
    bits = ((codes.to(torch.int32) >> bit) & 1).reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=codes.device)
    return (bits * weights).sum(dim=-1).to(torch.uint8)


def unpack_high_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of pack_high_bits: (..., count/8) bytes -> (..., count) bits as int32 (0 or 1)."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], count)
