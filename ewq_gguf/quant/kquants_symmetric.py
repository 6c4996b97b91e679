"""Q6_K and Q3_K: the symmetric k-quants (signed levels times a per-16 scale times a per-256 fp16 scale).

Bytes match ggml's quantize_q6_K / quantize_q3_K (ggml-quants.c, through ggml_quantize_chunk), with and without
an importance matrix. Their scale searches, make_qx_quants and make_q3_quants, run per group of 16 values; here every
group of a chunk is searched at once, stepping through the 16 values of the groups so that ggml's left-to-right
float32 sums become whole-tensor additions in the same order. Only the order of ggml's own loops is kept: every
float operation is the same IEEE operation on the same operands (no fused multiply-add; the reference library is
built without FMA), rounding is ggml's nearest_int (round half to even), and fp16 is round to nearest even.

Layout inside this module: a chunk of rows (R, N) is held "group-major" as (16, R, N/16): element i of group g of row
r at [i, r, g]. Per-group results are (R, N/16); per-block (256 values) results are (R, N/256).
"""
from __future__ import annotations

from typing import Optional

import torch
from gguf import GGMLQuantizationType as QType

from .chunking import encode_in_chunks, to_element_major
from .codec import Codec
from .ggml_arithmetic import as_int8, divide, first_absmax, fp16_round, nearest_int, sequential_sum
from .packing import fp16_bytes
from .scale_search import GROUP_MAX_EPS, block_square_sums, importance_weights, make_q3_quants, make_qx_quants

QK_K = 256
GROUP = 16
GROUPS_PER_BLOCK = QK_K // GROUP
Q6_K_BLOCK_BYTES = 210
Q3_K_BLOCK_BYTES = 110
# Rows are encoded in chunks of about this many values on CPU: large enough that torch's per-operation overhead is
# small against the work and small enough that the search's working tensors stay in cache (GPUs take more, see
# chunking.device_chunk_values).
CHUNK_VALUES = 1 << 18


def _to_group_major(values: torch.Tensor) -> torch.Tensor:
    """(R, N) -> (16, R, N/16) with element i of each group of 16 along the first dimension."""
    return to_element_major(values, GROUP).reshape(GROUP, values.shape[0], -1)


def _from_group_major(values: torch.Tensor) -> torch.Tensor:
    """(16, R, G) -> (R, G*16), the inverse of _to_group_major."""
    return values.permute(1, 2, 0).reshape(values.shape[1], -1)


def _requantize(x: torch.Tensor, levels: torch.Tensor, group_d: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml's second pass: levels from the stored (fp16 d) * (integer scale); groups whose product is 0 keep the
    levels of the search."""
    requantized = (nearest_int(x / group_d).clamp_(-nmax, nmax - 1) + nmax).to(torch.uint8)
    keep = group_d == 0
    if bool(keep.any()):
        requantized[:, keep] = levels[:, keep]
    return requantized


def _bit_fields(values: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """values[0] | values[1] << width | values[2] << 2*width ... along dim, in the dtype of values."""
    fields = values.unbind(dim)
    packed = fields[0].clone()
    for k, field in enumerate(fields[1:], start=1):
        packed |= field << (width * k)
    return packed


def _split_bit_fields(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of _bit_fields with dim=-2: (..., n) -> (..., count, n)."""
    shifts = (torch.arange(count, dtype=torch.int32, device=packed.device) * width).reshape(count, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


# ---------------------------------------------------------------- Q6_K

def _encode_q6_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    n_rows, n_per_row = rows.shape
    n_blocks = n_per_row // QK_K
    x = _to_group_major(rows)
    # quantize_row_q6_K_impl passes the imatrix slice itself as the weights; without one, ggml uses x*x
    weights = x * x if importance is None else importance.reshape(-1, GROUP).t().unsqueeze(1)
    scales, levels = make_qx_quants(x, 32, weights)

    block_scales = scales.reshape(n_rows, n_blocks, GROUPS_PER_BLOCK)
    amax, max_scale = first_absmax(block_scales, dim=-1)
    zero_block = amax < GROUP_MAX_EPS
    iscale = divide(-128.0, torch.where(zero_block, torch.ones_like(max_scale), max_scale))
    d_raw = torch.where(zero_block, torch.zeros_like(iscale), divide(1.0, iscale))
    codes = as_int8(nearest_int(iscale.unsqueeze(-1) * block_scales).clamp_(max=127))
    codes = torch.where(zero_block.unsqueeze(-1), torch.zeros_like(codes), codes)
    group_d = (fp16_round(d_raw).unsqueeze(-1) * codes.to(torch.float32)).reshape(n_rows, -1)
    levels = _from_group_major(_requantize(x, levels, group_d, 32)).reshape(n_rows, n_blocks, QK_K)
    if bool(zero_block.any()):
        levels[zero_block] = 0  # ggml writes a zero block

    levels = levels.reshape(n_rows, n_blocks, 2, 4, 32)  # [half, quarter, l] is value 128*half + 32*quarter + l
    low, high = levels & 0xF, levels >> 4
    ql = torch.cat([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], dim=-1)
    return torch.cat([
        ql.reshape(n_rows, n_blocks, 128),
        _bit_fields(high, 2, dim=-2).reshape(n_rows, n_blocks, 64),
        (codes & 0xFF).to(torch.uint8),
        fp16_bytes(d_raw),
    ], dim=-1).reshape(n_rows, -1)


def quantize_q6_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return encode_in_chunks(rows, rows.shape[1] // QK_K * Q6_K_BLOCK_BYTES, CHUNK_VALUES,
                            lambda chunk: _encode_q6_k(rows[chunk], importance))


def dequantize_q6_k(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = data.reshape(data.shape[0], n_per_row // QK_K, Q6_K_BLOCK_BYTES)
    ql = blocks[..., :128].to(torch.int32).reshape(*blocks.shape[:2], 2, 2, 32)
    qh = blocks[..., 128:192].to(torch.int32).reshape(*blocks.shape[:2], 2, 32)
    low = torch.stack([ql[:, :, :, 0] & 0xF, ql[:, :, :, 1] & 0xF, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], dim=-2)
    levels = (low | (_split_bit_fields(qh, 2, 4) << 4)) - 32
    group_scales = blocks[..., 192:208].view(torch.int8).to(torch.float32)
    d = blocks[..., 208:210].contiguous().view(torch.float16).to(torch.float32)
    group_d = (d * group_scales).repeat_interleave(GROUP, dim=-1)  # ggml: (d * sc) * q
    return (group_d * levels.reshape(*blocks.shape[:2], QK_K).to(torch.float32)).reshape(data.shape[0], n_per_row)


# ---------------------------------------------------------------- Q3_K

def _encode_q3_k(rows: torch.Tensor, importance: Optional[torch.Tensor],
                 sigma2: Optional[torch.Tensor] = None) -> torch.Tensor:
    n_rows, n_per_row = rows.shape
    n_blocks = n_per_row // QK_K
    x = _to_group_major(rows)
    if importance is None:
        # quantize_row_q3_K_ref: make_q3_quants per group, then the group scales on a symmetric 6-bit grid
        scales, levels = make_q3_quants(x.reshape(GROUP, -1))
        scales, levels = scales.reshape(n_rows, -1), levels.reshape(x.shape)
        block_scales = scales.reshape(n_rows, n_blocks, GROUPS_PER_BLOCK)
        _, max_scale = first_absmax(block_scales, dim=-1)
        nonzero = max_scale != 0
        iscale = divide(-32.0, torch.where(nonzero, max_scale, torch.ones_like(max_scale)))
        codes = as_int8(nearest_int(iscale.unsqueeze(-1) * block_scales)).clamp_(-32, 31) + 32
        codes = torch.where(nonzero.unsqueeze(-1), codes, torch.zeros_like(codes)).to(torch.uint8)
        d_raw = torch.where(nonzero, divide(1.0, iscale), torch.zeros_like(iscale))
    else:
        # quantize_row_q3_K_impl: weights imatrix * sqrt(sigma2 + x^2), then the group scales fitted by
        # make_qx_quants weighted by each group's total weight
        weights = importance_weights(importance, x.reshape(GROUP, -1), sigma2.repeat_interleave(GROUPS_PER_BLOCK))
        weights = weights.reshape(x.shape)
        group_weights = sequential_sum(weights)
        scales, levels = make_qx_quants(x, 4, weights)
        d_raw, codes = make_qx_quants(
            scales.reshape(n_rows, n_blocks, GROUPS_PER_BLOCK).permute(2, 0, 1),
            32,
            group_weights.reshape(n_rows, n_blocks, GROUPS_PER_BLOCK).permute(2, 0, 1),
        )
        codes = codes.permute(1, 2, 0)
    group_d = (fp16_round(d_raw).unsqueeze(-1) * (codes.to(torch.float32) - 32)).reshape(n_rows, -1)
    levels = _from_group_major(_requantize(x, levels, group_d, 4)).reshape(n_rows, n_blocks, QK_K)

    hmask = _bit_fields((levels >> 2).reshape(n_rows, n_blocks, 8, 32), 1, dim=-2)  # bit b of byte m: 32*b + m
    qs = _bit_fields((levels & 3).reshape(n_rows, n_blocks, 2, 4, 32), 2, dim=-2)
    scale_low = (codes[..., :8] & 0xF) | ((codes[..., 8:] & 0xF) << 4)
    scale_high = _bit_fields((codes >> 4).reshape(n_rows, n_blocks, 4, 4), 2, dim=-2)
    return torch.cat([
        hmask, qs.reshape(n_rows, n_blocks, 64), scale_low, scale_high, fp16_bytes(d_raw),
    ], dim=-1).reshape(n_rows, -1)


def quantize_q3_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    # quantize_row_q3_K_impl's sigma2 = 2*sum(x^2)/256 per block, for all rows at once (the 256 sequential
    # additions are far cheaper per value over many rows than chunk by chunk)
    sigma2 = None if importance is None else (block_square_sums(rows, QK_K) * 2 / QK_K).reshape(rows.shape[0], -1)

    def encode(chunk: slice) -> torch.Tensor:
        return _encode_q3_k(rows[chunk], importance, None if sigma2 is None else sigma2[chunk])

    return encode_in_chunks(rows, rows.shape[1] // QK_K * Q3_K_BLOCK_BYTES, CHUNK_VALUES, encode)


def dequantize_q3_k(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = data.reshape(data.shape[0], n_per_row // QK_K, Q3_K_BLOCK_BYTES).to(torch.int32)
    high = _split_bit_fields(blocks[..., :32], 1, 8)  # (..., 8, 32): bit b of hmask[m] is element 32*b + m
    low = _split_bit_fields(blocks[..., 32:96].reshape(*blocks.shape[:2], 2, 32), 2, 4)
    levels = (low.reshape(high.shape) | (high << 2)).reshape(*blocks.shape[:2], QK_K) - 4
    scale_bytes = blocks[..., 96:108]
    scale_low = torch.cat([scale_bytes[..., :8] & 0xF, scale_bytes[..., :8] >> 4], dim=-1)
    scale_high = _split_bit_fields(scale_bytes[..., 8:12], 2, 4).reshape(*blocks.shape[:2], GROUPS_PER_BLOCK)
    group_scales = (scale_low | (scale_high << 4)) - 32
    d = data.reshape(blocks.shape)[..., 108:110].contiguous().view(torch.float16).to(torch.float32)
    group_d = (d * group_scales.to(torch.float32)).repeat_interleave(GROUP, dim=-1)  # ggml: d_all * (sc - 32)
    return (group_d * levels.to(torch.float32)).reshape(data.shape[0], n_per_row)


CODECS: dict[QType, Codec] = {
    QType.Q6_K: Codec(quantize=quantize_q6_k, dequantize=dequantize_q6_k, uses_importance=True),
    QType.Q3_K: Codec(quantize=quantize_q3_k, dequantize=dequantize_q3_k, uses_importance=True),
}
