"""Q2_K, Q4_K and Q5_K: the affine k-quants (x ~ d*sc*q - dmin*m), byte-identical to ggml_quantize_chunk.

ggml fits a scale and a minimum to every sub-block (make_qkx2_quants without an importance vector,
make_qkx3_quants with one), then quantizes the sub-block scales and minimums against one fp16 pair per 256-element
super-block (directly without importance, through make_qp_quants with it) and finally requantizes every value
against the stored scales. Here each step runs on all sub-blocks at once: a sub-block's elements lie along
dimension 0 of a (n, sub_blocks) tensor, so ggml's left-to-right sums become n vector additions in the same order,
and its per-sub-block branches become masks. Only the loops over a sub-block's elements, over the search steps and
over make_qp_quants' passes are Python loops.

Non-finite input with an importance vector is outside what is matched: make_qp_quants' handling of NaN scales is
not reproduced (the writer refuses non-finite weights before they get here).
"""
from __future__ import annotations

from typing import Optional

import torch
from gguf import GGMLQuantizationType as QType

from .chunking import encode_in_chunks, to_element_major
from .codec import Codec
from .ggml_arithmetic import divide, exact_sqrt, first_max, fp16_round, low_byte, nearest_int, sequential_sum
from .packing import fp16_bytes
from .scale_search import (
    SEARCH_Q2_K, SEARCH_Q4_K, SEARCH_Q5_K, SEARCH_WITH_IMPORTANCE, block_square_sums, importance_weights,
    make_qkx_quants, make_qp_quants,
)

SUPER_BLOCK = 256  # QK_K
# Values per encoding chunk on CPU: big enough that per-op overhead is small, small enough that the search's
# working set stays in cache (GPUs take more, see chunking.device_chunk_values).
CHUNK_VALUES = 1 << 19


def _fit_scales_and_mins(scales, mins, sub_weight, n_blocks: int, nmax: int):
    """make_qp_quants of each super-block's sub-block scales and of its minimums (one call for both).

    All inputs are per sub-block, super-block-major (n_blocks * k,). Returns the codes (n_blocks, k) int32 of the
    scales and of the minimums, then their fp32 super-block scales d and dmin (n_blocks,).
    """
    both = torch.cat([scales.reshape(n_blocks, -1), mins.reshape(n_blocks, -1)]).t().contiguous()
    weights = sub_weight.reshape(n_blocks, -1).repeat(2, 1).t().contiguous()
    codes, block_scales = make_qp_quants(both, nmax, weights)
    codes = codes.t()
    return codes[:n_blocks], codes[n_blocks:], block_scales[:n_blocks], block_scales[n_blocks:]


def _requantize(x, levels, d, dm, nmax):
    """ggml's last pass: l = nearest_int((x + dm)/d) clamped, for sub-blocks whose d is not 0 (others keep levels).

    Returns int32 levels like x."""
    fresh = nearest_int((x + dm) / d).clamp_(0, nmax)
    return torch.where(d != 0, fresh, levels.to(torch.int32))


# ---------------------------------------------------------------- Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales

def _pack_scales_6bit(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12-byte scales field of Q4_K/Q5_K from 8 scale and 8 min codes per block ((n_blocks, 8) int32 each)."""
    low_s, high_s = ls[:, :4], ls[:, 4:]
    low_m, high_m = lm[:, :4], lm[:, 4:]
    return torch.cat(
        [
            low_byte(low_s | ((high_s >> 4) << 6)),
            low_byte(low_m | ((high_m >> 4) << 6)),
            low_byte((high_s & 0xF) | ((high_m & 0xF) << 4)),
        ],
        dim=1,
    )


def _unpack_scales_6bit(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: (scales, mins) as int32 (n_blocks, 8)."""
    q = packed.to(torch.int32)
    scales = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    mins = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return scales, mins


def _sub_block_codes(values: torch.Tensor, top: int, clamp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The *_ref encoders' quantization of each super-block's sub-block scales (or minimums), rows of values.

    ggml: `max = 0; if (v > max) max = v;`, codes nearest_int(top/max * v) (stored as uint8 and, with clamp, capped
    at top), super-block scale max/top; codes 0 where max is 0. Returns (codes int32, scale float32 per row).
    """
    highest = first_max(values, dim=1, start=0.0)
    inverse = torch.where(highest > 0, divide(float(top), highest), torch.zeros_like(highest))
    codes = nearest_int(inverse[:, None] * values)
    if clamp:
        codes = (codes & 0xFF).clamp_(max=top)
    return codes, divide(highest, float(top))


def _encode_32(rows: torch.Tensor, importance: Optional[torch.Tensor], nmax: int, search: dict):
    """Header, packed scales and levels of Q4_K (nmax 15) or Q5_K (nmax 31) super-blocks of rows.

    Returns (header bytes (n_blocks, 4), scales bytes (n_blocks, 12), levels int32 (n_blocks, 256)).
    """
    n_blocks = rows.numel() // SUPER_BLOCK
    x = to_element_major(rows, 32)
    if importance is None:
        av_x = exact_sqrt(sequential_sum(x * x) / 32)
        scales, mins, levels = make_qkx_quants(x, nmax, av_x + x.abs(), **search)
        ls, d = _sub_block_codes(scales.reshape(n_blocks, 8), 63, clamp=True)
        lm, dmin = _sub_block_codes(mins.reshape(n_blocks, 8), 63, clamp=True)
    else:
        sigma2 = 2 * block_square_sums(rows, SUPER_BLOCK) / SUPER_BLOCK
        weights = importance_weights(importance, x, sigma2.repeat_interleave(8))
        scales, mins, levels = make_qkx_quants(x, nmax, weights, **SEARCH_WITH_IMPORTANCE)
        ls, lm, d, dmin = _fit_scales_and_mins(scales, mins, sequential_sum(weights), n_blocks, 63)
        if nmax == 31:  # quantize_row_q5_K_impl clamps the codes, q4_K's does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    packed = _pack_scales_6bit(ls, lm)
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin)], dim=1)
    sc, m = _unpack_scales_6bit(packed)
    d_sub = (fp16_round(d)[:, None] * sc).reshape(-1)
    dm_sub = (fp16_round(dmin)[:, None] * m).reshape(-1)
    levels = _requantize(x, levels, d_sub, dm_sub, nmax)
    return header, packed, levels.t().reshape(n_blocks, SUPER_BLOCK)


def _pairs_of_32(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels (n_blocks, 256) -> (first, second) halves of each 64-element chunk, (n_blocks, 4, 32) each."""
    chunks = levels.reshape(-1, 4, 2, 32)
    return chunks[:, :, 0, :], chunks[:, :, 1, :]


def _encode_q4_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    header, scales, levels = _encode_32(rows, importance, 15, SEARCH_Q4_K)
    first, second = _pairs_of_32(levels)
    qs = low_byte(first | (second << 4)).reshape(-1, 128)
    return torch.cat([header, scales, qs], dim=1)


def _encode_q5_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    header, scales, levels = _encode_32(rows, importance, 31, SEARCH_Q5_K)
    first, second = _pairs_of_32(levels)
    qs = low_byte((first & 0xF) | ((second & 0xF) << 4)).reshape(-1, 128)
    # bit 4 of element 64*c + 32*h + j goes to bit 2*c + h of qh[j]
    high = (levels.reshape(-1, 8, 32) >> 4) & 1
    shifts = torch.arange(8, device=levels.device, dtype=torch.int32)[None, :, None]
    qh = low_byte((high << shifts).sum(dim=1, dtype=torch.int32))
    return torch.cat([header, scales, qh, qs], dim=1)


# ---------------------------------------------------------------- Q2_K: 16 sub-blocks of 16, 4-bit scales

def _encode_q2_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    n_blocks = rows.numel() // SUPER_BLOCK
    x = to_element_major(rows, 16)
    if importance is None:
        scales, mins, levels = make_qkx_quants(x, 3, x.abs(), **SEARCH_Q2_K)
        ls, d = _sub_block_codes(scales.reshape(n_blocks, 16), 15, clamp=False)
        lm, dmin = _sub_block_codes(mins.reshape(n_blocks, 16), 15, clamp=False)
    else:
        sigma2 = block_square_sums(rows, SUPER_BLOCK) / SUPER_BLOCK
        weights = importance_weights(importance, x, sigma2.repeat_interleave(16))
        scales, mins, levels = make_qkx_quants(x, 3, weights, **SEARCH_WITH_IMPORTANCE)
        ls, lm, d, dmin = _fit_scales_and_mins(scales, mins, sequential_sum(weights), n_blocks, 15)
    packed = low_byte(ls | (lm << 4))
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin)], dim=1)
    codes = packed.to(torch.int32)
    d_sub = (fp16_round(d)[:, None] * (codes & 0xF)).reshape(-1)
    dm_sub = (fp16_round(dmin)[:, None] * (codes >> 4)).reshape(-1)
    levels = _requantize(x, levels, d_sub, dm_sub, 3).t().reshape(n_blocks, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=rows.device, dtype=torch.int32)[None, None, :, None]
    qs = low_byte((levels << shifts).sum(dim=2, dtype=torch.int32)).reshape(n_blocks, 64)
    return torch.cat([packed, qs, header], dim=1)


# ---------------------------------------------------------------- driver and decoders

def _quantizer(encode, block_bytes: int):
    """Codec.quantize running encode(rows, importance) -> (n_blocks, block_bytes) over chunks of whole rows."""
    def quantize(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
        return encode_in_chunks(rows, rows.shape[1] // SUPER_BLOCK * block_bytes, CHUNK_VALUES,
                                lambda chunk: encode(rows[chunk], importance))

    return quantize


def _header_floats(data: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, dmin) float32 (n_blocks, 1) from the two fp16 at data[:, offset:offset+4]."""
    halves = data[:, offset:offset + 4].contiguous().view(torch.float16).to(torch.float32)
    return halves[:, 0:1], halves[:, 1:2]


def _dequantize_q2_k(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = data.reshape(-1, 84)
    codes = blocks[:, :16].to(torch.int32)
    qs = blocks[:, 16:80].to(torch.int32).reshape(-1, 2, 1, 32)
    d, dmin = _header_floats(blocks, 80)
    shifts = torch.tensor([0, 2, 4, 6], device=data.device, dtype=torch.int32)[None, None, :, None]
    levels = ((qs >> shifts) & 3).reshape(-1, 16, 16).to(torch.float32)
    scale = (d * (codes & 0xF))[:, :, None]
    minimum = (dmin * (codes >> 4))[:, :, None]
    return (scale * levels - minimum).reshape(-1, n_per_row)


def _dequantize_32(levels: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _header_floats(blocks, 0)
    sc, m = _unpack_scales_6bit(blocks[:, 4:16])
    scale = (d * sc)[:, :, None]
    minimum = (dmin * m)[:, :, None]
    return scale * levels.reshape(-1, 8, 32).to(torch.float32) - minimum


def _dequantize_q4_k(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = data.reshape(-1, 144)
    qs = blocks[:, 16:144].to(torch.int32).reshape(-1, 4, 1, 32)
    levels = torch.cat([qs & 0xF, qs >> 4], dim=2)
    return _dequantize_32(levels, blocks).reshape(-1, n_per_row)


def _dequantize_q5_k(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = data.reshape(-1, 176)
    qh = blocks[:, 16:48].to(torch.int32).reshape(-1, 1, 32)
    qs = blocks[:, 48:176].to(torch.int32).reshape(-1, 4, 1, 32)
    shifts = torch.arange(8, device=data.device, dtype=torch.int32)[None, :, None]
    high = ((qh >> shifts) & 1) << 4
    levels = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32) | high
    return _dequantize_32(levels, blocks).reshape(-1, n_per_row)


CODECS: dict[QType, Codec] = {
    QType.Q2_K: Codec(_quantizer(_encode_q2_k, 84), _dequantize_q2_k, uses_importance=True),
    QType.Q4_K: Codec(_quantizer(_encode_q4_k, 144), _dequantize_q4_k, uses_importance=True),
    QType.Q5_K: Codec(_quantizer(_encode_q5_k, 176), _dequantize_q5_k, uses_importance=True),
}
