"""Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1: the 32-value block types, byte-identical to ggml_quantize_chunk.

Without importance ggml uses its *_ref encoders: one scale (and, for the _1 types, an offset) from the block's
extremes, then truncating casts. With importance (an imatrix) Q4_0/Q5_0 search the scale with make_qx_quants and
Q4_1/Q5_1 search scale and offset with make_qkx3_quants, both weighted by imatrix * sqrt(sigma2 + x^2) where
sigma2 is the row's mean square; Q8_0 ignores importance. The C casts of float to int8_t/uint8_t are reproduced as
x86-64 executes them (truncation, low byte), which only matters for NaN input.

Layout: a chunk of rows is seen as (32, blocks), element i of every block along dim 0, so per-block scans run along
dim 0: a transposed view for the elementwise *_ref encoders, a contiguous copy for the searches' running sums.
"""
from __future__ import annotations

from typing import Optional

import torch
from gguf import GGMLQuantizationType as QType

from .chunking import encode_in_chunks, to_element_major
from .codec import Codec
from .ggml_arithmetic import (
    FLT_MAX, all_finite, as_int8, divide, first_absmax, first_max, first_min, low_byte, nonzero_reciprocal,
    round_half_away, truncate_to_int,
)
from .packing import fp16_bytes, pack_high_bits, pack_nibbles, unpack_high_bits, unpack_nibbles
from .scale_search import block_square_sums, importance_weights, make_qkx_quants, make_qx_quants

BLOCK = 32
# Rows are encoded in chunks of about this many values: large enough to amortise torch's per-call cost, small
# enough to bound memory.
CHUNK_VALUES = 1 << 20
# Bytes per block of each type (gguf's table, repeated here to lay out the fields).
BLOCK_BYTES = {QType.Q8_0: 34, QType.Q4_0: 18, QType.Q4_1: 20, QType.Q5_0: 22, QType.Q5_1: 24}


def _encode_rows(rows: torch.Tensor, importance: Optional[torch.Tensor], block_bytes: int, encode) -> torch.Tensor:
    """Run encode(x (32, blocks), weights or None) over chunks of rows; returns (n_rows, row_bytes)."""
    n_rows, n_per_row = rows.shape
    blocks_per_row = n_per_row // BLOCK
    # ggml's sigma2: the mean square of the whole row, summed left to right
    sigma2 = None if importance is None else divide(block_square_sums(rows, n_per_row), float(n_per_row))

    def encode_chunk(chunk: slice) -> torch.Tensor:
        part = rows[chunk]
        if importance is None:
            # a transposed view, not a copy: elementwise results keep the blocks' memory order, so the packed
            # bytes come out block by block without a transpose back
            return encode(part.reshape(-1, BLOCK).t(), None)
        # the searches add along dim 0 one element at a time, which wants each element's row contiguous
        x = to_element_major(part, BLOCK)
        return encode(x, importance_weights(importance, x, sigma2[chunk].repeat_interleave(blocks_per_row)))

    return encode_in_chunks(rows, blocks_per_row * block_bytes, CHUNK_VALUES, encode_chunk)


def _pack_low_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(32, blocks) codes -> (blocks, 16) bytes code[j] | code[j+16] << 4 (ggml's qs layout)."""
    return pack_nibbles(codes[:16], codes[16:]).t()


def _pack_five_bit(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(32, blocks) 5-bit codes -> (qh (blocks, 4), qs (blocks, 16)): bit 4 of code j is bit j of the uint32 qh."""
    return pack_high_bits(codes.t(), bit=4), _pack_low_nibbles(codes)


# ---------------------------------------------------------------- encoders without importance (ggml *_ref)
#
# Each has a fast path for the usual case, finite values and finite reciprocal scales, where every scaled value
# lies well inside int32 and C's casts are plain truncations; otherwise the casts are emulated exactly.

def _q8_0_amax(x: torch.Tensor, finite: bool) -> torch.Tensor:
    """ggml's `amax = MAX(amax, fabsf(v))` scan: a NaN is taken when met and dropped by the next value."""
    if finite:
        return torch.maximum(x.amax(dim=0), -x.amin(dim=0)).abs()
    magnitude = x.abs()
    nan = torch.isnan(magnitude)
    position = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    last_nan = torch.where(nan, position, torch.full_like(position, -1)).amax(dim=0)
    after = torch.where(position > last_nan, magnitude, torch.zeros_like(magnitude)).amax(dim=0)
    return torch.where(last_nan == x.shape[0] - 1, torch.full_like(after, float("nan")), after)


def _c_roundf_to_int(values: torch.Tensor) -> torch.Tensor:
    """`(int)roundf(v)` on x86-64 for any float: NaN, infinities and |v| >= 2**31 give INT_MIN."""
    valid = torch.isfinite(values) & (values.abs() < 2147483648.0)
    rounded = round_half_away(torch.where(valid, values, torch.zeros_like(values)))
    return torch.where(valid, rounded, torch.full_like(rounded, -2147483648))


def _encode_q8_0(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    finite = all_finite(x)
    d = divide(_q8_0_amax(x, finite), 127.0)
    inverse = nonzero_reciprocal(d)
    scaled = x * inverse
    if finite and all_finite(inverse):
        codes = round_half_away(scaled).to(torch.int8).view(torch.uint8)
    else:
        codes = low_byte(_c_roundf_to_int(scaled))
    return torch.cat([fp16_bytes(d), codes.t()], dim=1)


def _truncated_codes(scaled: torch.Tensor, offset: float, top: Optional[int], fast: bool) -> torch.Tensor:
    """`MIN(top, (int8_t)(scaled + offset))` stored in a uint8_t, or `(uint8_t)(scaled + offset)` when top is None."""
    shifted = scaled + offset
    if fast:  # 0 <= shifted < 2*top + 1: the cast is a truncation that fits the byte
        truncated = shifted.to(torch.int32)
        return (truncated if top is None else truncated.clamp_(max=top)).to(torch.uint8)
    truncated = truncate_to_int(shifted)
    if top is None:
        return low_byte(truncated)
    return low_byte(torch.clamp(as_int8(truncated), max=top))


def _symmetric_ref(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0 ref: d = max/-levels from the first largest magnitude, codes of x/d + levels + 0.5 truncated."""
    _, signed_max = first_absmax(x, dim=0)
    d = divide(signed_max, float(-levels))
    inverse = nonzero_reciprocal(d)
    codes = _truncated_codes(x * inverse, levels + 0.5, 2 * levels - 1, all_finite(x, inverse))
    return d, codes


def _affine_ref(x: torch.Tensor, levels: int, clamp_codes: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1 ref: d = (max - min)/levels, codes of (x - min)/d + 0.5 truncated."""
    low = first_min(x, dim=0, start=FLT_MAX)
    high = first_max(x, dim=0, start=-FLT_MAX)
    d = divide(high - low, float(levels))
    inverse = nonzero_reciprocal(d)
    fast = all_finite(x, inverse)
    codes = _truncated_codes((x - low) * inverse, 0.5, levels if clamp_codes else None, fast)
    return d, low, codes


def _encode_q4_0(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        d, codes = _symmetric_ref(x, 8)
        qs = (codes[:16] | (codes[16:] << 4)).t()  # ggml ORs the full byte xi0 (at most 15 here)
    else:
        d, codes = make_qx_quants(x, 8, weights)
        qs = _pack_low_nibbles(codes)
    return torch.cat([fp16_bytes(d), qs], dim=1)


def _encode_q5_0(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        d, codes = _symmetric_ref(x, 16)
    else:
        d, codes = make_qx_quants(x, 16, weights)
    qh, qs = _pack_five_bit(codes)
    return torch.cat([fp16_bytes(d), qh, qs], dim=1)


def _encode_q4_1(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        d, offset, codes = _affine_ref(x, 15, clamp_codes=True)
        qs = (codes[:16] | (codes[16:] << 4)).t()  # ggml ORs the full byte xi0 (at most 15 here)
    else:
        d, the_min, codes = make_qkx_quants(x, 15, weights)
        offset = -the_min
        qs = _pack_low_nibbles(codes)
    return torch.cat([fp16_bytes(d), fp16_bytes(offset), qs], dim=1)


def _encode_q5_1(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        d, offset, codes = _affine_ref(x, 31, clamp_codes=False)
    else:
        d, the_min, codes = make_qkx_quants(x, 31, weights)
        offset = -the_min
    qh, qs = _pack_five_bit(codes)
    return torch.cat([fp16_bytes(d), fp16_bytes(offset), qh, qs], dim=1)


# ---------------------------------------------------------------- decoders (ggml's dequantize_row_*)

def _blocks(data: torch.Tensor, qtype: QType, n_per_row: int) -> torch.Tensor:
    return data.reshape(data.shape[0], n_per_row // BLOCK, BLOCK_BYTES[qtype])


def _fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _five_bit(blocks: torch.Tensor, qh_start: int) -> torch.Tensor:
    high = unpack_high_bits(blocks[..., qh_start:qh_start + 4], BLOCK)
    return unpack_nibbles(blocks[..., qh_start + 4:qh_start + 20]) | (high << 4)


def _decode_q8_0(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = _blocks(data, QType.Q8_0, n_per_row)
    codes = blocks[..., 2:].contiguous().view(torch.int8).to(torch.float32)
    return (codes * _fp16_field(blocks, 0)).reshape(data.shape[0], n_per_row)


def _decode_q4_0(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = _blocks(data, QType.Q4_0, n_per_row)
    levels = (unpack_nibbles(blocks[..., 2:]) - 8).to(torch.float32)
    return (levels * _fp16_field(blocks, 0)).reshape(data.shape[0], n_per_row)


def _decode_q4_1(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = _blocks(data, QType.Q4_1, n_per_row)
    levels = unpack_nibbles(blocks[..., 4:]).to(torch.float32)
    return (levels * _fp16_field(blocks, 0) + _fp16_field(blocks, 2)).reshape(data.shape[0], n_per_row)


def _decode_q5_0(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = _blocks(data, QType.Q5_0, n_per_row)
    levels = (_five_bit(blocks, 2) - 16).to(torch.float32)
    return (levels * _fp16_field(blocks, 0)).reshape(data.shape[0], n_per_row)


def _decode_q5_1(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = _blocks(data, QType.Q5_1, n_per_row)
    levels = _five_bit(blocks, 4).to(torch.float32)
    return (levels * _fp16_field(blocks, 0) + _fp16_field(blocks, 2)).reshape(data.shape[0], n_per_row)


def _codec(qtype: QType, encode, decode, uses_importance: bool) -> Codec:
    def quantize(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
        return _encode_rows(rows, importance if uses_importance else None, BLOCK_BYTES[qtype], encode)

    return Codec(quantize=quantize, dequantize=decode, uses_importance=uses_importance)


CODECS: dict[QType, Codec] = {
    QType.Q8_0: _codec(QType.Q8_0, _encode_q8_0, _decode_q8_0, uses_importance=False),
    QType.Q4_0: _codec(QType.Q4_0, _encode_q4_0, _decode_q4_0, uses_importance=True),
    QType.Q4_1: _codec(QType.Q4_1, _encode_q4_1, _decode_q4_1, uses_importance=True),
    QType.Q5_0: _codec(QType.Q5_0, _encode_q5_0, _decode_q5_0, uses_importance=True),
    QType.Q5_1: _codec(QType.Q5_1, _encode_q5_1, _decode_q5_1, uses_importance=True),
}
