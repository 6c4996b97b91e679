"""MXFP4 (gpt-oss's expert weights): 32 values per block as 4-bit E2M1 codes under one power-of-two scale,
byte-identical to ggml_quantize_chunk.

ggml's quantize_mxfp4 ignores the importance vector and runs quantize_row_mxfp4_ref on every block:
- amax, the largest magnitude (`if (amax < fabsf(v)) amax = fabsf(v)` from 0, so NaN is skipped);
- the E8M0 exponent e = (uint8_t)(floorf(log2f(amax)) - 2 + 127), or 0 where amax is 0;
- the scale d = GGML_E8M0_TO_FP32_HALF(e) = 2^(e - 128) (half of E8M0's 2^(e - 127): kvalues_mxfp4 holds the E2M1
  values doubled, 0, 1, 2, 3, 4, 6, 8, 12, then the same negated);
- each value's code, best_index_mxfp4: the first of the 16 kvalues whose float32 error |kvalue*d - x| is least.
A block is e, then 16 bytes code[j] | code[j+16] << 4 (block_mxfp4 in ggml-common.h).

Layout: a chunk of rows is seen as (blocks, 32), one block per row, as it lies in memory.
"""
from __future__ import annotations

from typing import Optional

import torch
from gguf import GGMLQuantizationType as QType

from .chunking import encode_in_chunks
from .codec import Codec
from .ggml_arithmetic import all_finite, divide, first_absmax, low_byte, truncate_to_int
from .packing import pack_nibbles, unpack_nibbles

BLOCK = 32
BLOCK_BYTES = 17
CHUNK_VALUES = 1 << 20
# kvalues_mxfp4[0:8], in ggml's order; kvalues_mxfp4[8:16] are the same negated (index 8 is a second zero)
MAGNITUDES = (0, 1, 2, 3, 4, 6, 8, 12)
KVALUES = MAGNITUDES + tuple(-magnitude for magnitude in MAGNITUDES)
FIRST_NEGATED = len(MAGNITUDES)
# The nearest magnitude to t changes at the midpoints, halves of the integers 1, 3, 5, 7, 10, 14, 20: t lies above
# such a midpoint m exactly when the integer 2m lies below ceil(2t). So ceil(2t) alone picks the magnitude, through
# a table of the midpoints below each ceil(2t) up to 21 (beyond it, all seven are).
_TWICE_MIDPOINTS = tuple(low + high for low, high in zip(MAGNITUDES, MAGNITUDES[1:]))
_INDEX_BY_CEIL_TWICE = tuple(sum(1 for twice in _TWICE_MIDPOINTS if twice < ceiling)
                             for ceiling in range(_TWICE_MIDPOINTS[-1] + 2))


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 for every exponent byte (the bits 0x00200000 << e for e < 2,
    where it is subnormal, else (e - 1) << 23)."""
    e = e.to(torch.int32)
    subnormal = 0x00200000 << e.clamp(max=1)
    return torch.where(e < 2, subnormal, (e - 1) << 23).view(torch.float32)


def block_exponents(amax: torch.Tensor) -> torch.Tensor:
    """e = (uint8_t)(floorf(log2f(amax)) - 2 + 127), 0 where amax is 0, as int32.

    floorf(log2f(a)) differs from a's binary exponent only just below a power of two, where log2f rounds up to the
    integer; the float64 log2 rounded to float32 rounds there as the C library's log2f does (tests/test_quant_mxfp4.py
    sweeps 256 floats either side of every power of two against ggml). Below 2^-125 the sum is negative and the cast
    keeps its low byte as x86-64 does (cvttss2si, then the byte): e wraps to 232..255, a scale so far above the block
    that every value takes code 0. An infinite amax gives INT_MIN, whose low byte is 0.
    """
    exponent = torch.log2(amax.to(torch.float64)).to(torch.float32).floor_()
    e = low_byte(truncate_to_int(exponent + 125.0)).to(torch.int32)
    return torch.where(amax > 0, e, torch.zeros_like(e))


def nearest_codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """best_index_mxfp4 of finite blocks x (blocks, 32) for the scales d (blocks, 1) ggml derives from them.

    For x >= 0 the negative kvalues are never nearer than kvalue 0, which comes first; for x < 0 the same holds of
    the positive ones, and |-k*d - x| is |k*d - |x||. So the code is that of the nearest magnitude to |x|/d (ties
    to the smaller, found first), plus 8 for negative x unless it is 0. Comparing |x|/d with the midpoints gives
    ggml's float32 answer: d is a power of two above amax/16, so |x|/d is exact unless it is far below the first
    midpoint; near a midpoint the two competing errors are exact (kvalue 0's is |x|, the others are Sterbenz
    subtractions, each magnitude being at most 3 times the one below), and every other kvalue is at least d
    further away.
    """
    table = torch.tensor(_INDEX_BY_CEIL_TWICE, dtype=torch.int32, device=x.device)
    # |x|/d <= 16, so doubling it is exact
    slots = divide(x.abs(), d).mul_(2.0).ceil_().clamp_(max=len(_INDEX_BY_CEIL_TWICE) - 1).to(torch.int32)
    magnitude_index = torch.index_select(table, 0, slots.reshape(-1)).reshape(x.shape)
    # where log2f rounds amax up to 2^128, d = 2^125 and kvalue*d overflows for 8 and 12: their error is inf, and
    # ggml keeps the largest magnitude whose product is finite
    magnitudes = torch.tensor(MAGNITUDES, dtype=torch.float32, device=x.device)
    largest = torch.isfinite(magnitudes * d).sum(dim=-1, keepdim=True, dtype=torch.int32) - 1
    magnitude_index = torch.minimum(magnitude_index, largest)
    negative = (x < 0) & (magnitude_index > 0)
    return magnitude_index + negative.to(torch.int32) * FIRST_NEGATED


def scanned_codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """best_index_mxfp4 for any x, step by step as ggml runs it: the strict `err < best_err` keeps the first of equal
    errors, and a NaN x (no error below a NaN) keeps index 0. It also covers blocks holding an infinity: e is 0
    there, d = 2^-128, and the errors of a value far above d all round to |x|, so it takes code 0 where the
    midpoints of nearest_codes would give 12."""
    best_error = (KVALUES[0] * d - x).abs()
    codes = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    for index, kvalue in enumerate(KVALUES[1:], start=1):
        error = (kvalue * d - x).abs()
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        codes.masked_fill_(better, index)
    return codes


def _encode(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_mxfp4_ref of blocks x (blocks, 32) -> (blocks, 17) bytes."""
    amax, _ = first_absmax(x, dim=1)
    e = block_exponents(amax).unsqueeze(1)
    d = e8m0_half(e)
    codes = nearest_codes(x, d) if all_finite(x) else scanned_codes(x, d)
    return torch.cat([e.to(torch.uint8), pack_nibbles(codes[:, :16], codes[:, 16:])], dim=1)


def quantize_mxfp4(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return encode_in_chunks(rows, rows.shape[1] // BLOCK * BLOCK_BYTES, CHUNK_VALUES,
                            lambda chunk: _encode(rows[chunk].reshape(-1, BLOCK)))


def dequantize_mxfp4(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    """dequantize_row_mxfp4: kvalue * d, exact (a small integer times a power of two; 12 * 2^127 is inf there too)."""
    blocks = data.reshape(data.shape[0], n_per_row // BLOCK, BLOCK_BYTES)
    d = e8m0_half(blocks[..., 0])
    kvalues = torch.tensor(KVALUES, dtype=torch.float32, device=data.device)
    values = kvalues[unpack_nibbles(blocks[..., 1:]).to(torch.int64)]
    return (values * d.unsqueeze(-1)).reshape(data.shape[0], n_per_row)


# importance is not used: ggml's quantize_mxfp4 marks quant_weights GGML_UNUSED and calls the _ref encoder
CODECS: dict[QType, Codec] = {
    QType.MXFP4: Codec(quantize=quantize_mxfp4, dequantize=dequantize_mxfp4, uses_importance=False),
}
