"""Q6_K and Q3_K: the symmetric k-quants (signed levels times a per-16 scale times a per-256 fp16 scale).

Bytes match ggml's quantize_q6_K / quantize_q3_K (ggml-quants.c). Their scale searches, make_qx_quants and
make_q3_quants, run per group of 16 values; here every group of a chunk is searched at once, with the 16 values of
a group along the first dimension so that ggml's left-to-right sums become 15 whole-tensor additions.

Layout inside this module: a chunk of rows (R, N) is held "group-major" as (16, R, N/16): element i of group g of row
r at [i, r, g]. Per-group results are (R, N/16); per-block (256 values) results are (R, N/256).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from .codec import Codec
from .common import as_int8, divide, exact_sqrt, first_absmax, fp16_bytes, fp16_round, nearest_int, row_chunks
from .common import sequential_sum, to_element_major

QK_K = 256
GROUP = 16
GROUPS_PER_BLOCK = QK_K // GROUP
GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest magnitude is below this is stored as zeros
Q6_K_BLOCK_BYTES = 210
Q3_K_BLOCK_BYTES = 110
# Rows are encoded in chunks of about this many values: large enough that torch's per-operation overhead is small
# against the work, small enough that the search's working tensors stay in cache.
CHUNK_VALUES = 1 << 18


def _candidate_numerators(nmax: int) -> np.ndarray:
    """ggml's inverse-scale numerators: -nmax (the first guess), then -(nmax + 0.1f*is) for is = -9..9, is != 0,
    each evaluated in float32 as the C expression is."""
    steps = [step for step in range(-9, 10) if step != 0]
    values = [-np.float32(nmax)] + [-(np.float32(nmax) + np.float32(0.1) * np.float32(step)) for step in steps]
    return np.array(values, dtype=np.float32)


def _to_group_major(values: torch.Tensor) -> torch.Tensor:
    """(R, N) -> (16, R, N/16) with element i of each group of 16 along the first dimension."""
    return to_element_major(values, GROUP).reshape(GROUP, values.shape[0], -1)


def _from_group_major(values: torch.Tensor) -> torch.Tensor:
    """(16, R, G) -> (R, G*16), the inverse of _to_group_major."""
    return values.permute(1, 2, 0).reshape(values.shape[1], -1)


def _levels(x: torch.Tensor, iscale: torch.Tensor, nmax: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """clamp(nearest_int(iscale*x), -nmax, nmax-1) as float32; |iscale*x| <= nmax+1 here, so round-half-even is
    exactly nearest_int."""
    return torch.mul(x, iscale, out=out).round_().clamp_(-nmax, nmax - 1)


def _group_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) per group of x (16, ...) as ggml's scan `if (fabsf(x) > amax) { amax = fabsf(x); max = x; }`.

    Two plain reductions decide every group whose largest magnitude has one sign; only groups holding both +m and
    -m need the first-occurrence rule, and go through common.first_absmax (much slower per element).
    """
    highest, lowest = x.amax(dim=0), x.amin(dim=0)
    amax = torch.maximum(highest, -lowest)
    signed_max = torch.where(highest >= -lowest, highest, lowest)
    tied = (highest == -lowest) & (highest > 0)
    if bool(tied.any()):
        positions = tied.nonzero(as_tuple=True)
        signed_max[positions] = first_absmax(x[(slice(None), *positions)], dim=0)[1]
    return amax, signed_max


def _sequential_sum0(terms: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 added left to right from +0.0, as ggml's `s += t[i]` loops (torch.sum reorders additions)."""
    total = terms[0] + 0.0  # C's sum starts at +0.0, which turns a first -0.0 into +0.0
    for term in terms[1:]:
        total += term
    return total


def _weighted_sums(x: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's `sumlx += w*x[i]*l; suml2 += w*l*l` over the 16 values (dim 0) of each group, in its order of
    operations. x and weights (16, G); levels (16, G) or (16, C, G) for C candidate levels of every group."""
    factors = torch.stack([weights * x, weights], dim=1)  # (16, 2, G)
    if levels.dim() > x.dim():
        factors = factors.unsqueeze(2)
        levels = levels.unsqueeze(1)
    products = factors * levels
    products[:, 1] *= levels[:, 0]
    sums = _sequential_sum0(products)
    return sums[0], sums[1]


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor):
    """ggml's make_qx_quants(n=16, nmax, x, L, rmse_type=1, weights) for groups x (16, ...), 16 values per column.

    weights broadcasts against x (x*x where ggml passes no quant weights). Returns (scale (...), levels (16, ...)
    int32 in [0, 2*nmax)), levels as ggml stores them in L and 0 for groups that are all (near) zero.

    All 19 candidate scales are evaluated at once; only the choice among them is sequential, as in ggml: candidate
    c replaces the best so far when sumlx_c^2 > best*suml2_c, with best = (sumlx/suml2)*sumlx of the last accepted.
    """
    group_shape = x.shape[1:]
    weights = weights.expand_as(x).reshape(GROUP, -1)
    x = x.reshape(GROUP, -1)
    amax, signed_max = _group_absmax(x)
    zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    numerators = _candidate_numerators(nmax)
    iscales = divide(torch.from_numpy(numerators).to(x.device).unsqueeze(-1), signed_max)  # (19, G)

    # |iscale*x| <= |numerator| (to an ulp) < 2**22, so round-half-even is exactly ggml's nearest_int
    levels = (x.unsqueeze(1) * iscales).round_().clamp_(-nmax, nmax - 1)  # (16, 19, G)
    sumlx, suml2 = _weighted_sums(x, weights, levels)  # (19, G) each

    ratio = sumlx / suml2
    # a candidate with suml2 <= 0 is never taken: give it a fit that loses every comparison
    fit = torch.where(suml2 > 0, sumlx * sumlx, torch.full_like(sumlx, float("-inf")))
    first_scale = torch.where(suml2[0] != 0, ratio[0], torch.zeros_like(ratio[0]))
    # per candidate (its best value, its index), so that one where() per step carries both
    candidates = torch.stack([ratio * sumlx, torch.arange(len(numerators), dtype=torch.float32, device=x.device)
                              .unsqueeze(-1).expand_as(sumlx)], dim=1)  # (19, 2, G)
    state = torch.stack([first_scale * sumlx[0], torch.zeros_like(first_scale)])
    for c in range(1, len(numerators)):
        better = fit[c] > state[0] * suml2[c]
        state = torch.where(better, candidates[c], state)

    chosen = state[1].to(torch.int64).unsqueeze(0)
    scale = torch.where(chosen[0] == 0, first_scale, ratio.gather(0, chosen)[0])
    levels = levels.gather(1, chosen.unsqueeze(0).expand(GROUP, 1, -1))[:, 0]
    levels = (levels.to(torch.int32) + nmax) * (~zero).to(torch.int32)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale.reshape(group_shape), levels.reshape(GROUP, *group_shape)


def make_q3_quants(x: torch.Tensor, nmax: int = 4, max_passes: int = 5):
    """ggml's make_q3_quants(n=16, nmax, x, L, do_rmse=true) for all groups of x (16, G) at once.

    ggml refines one level at a time, accepting a change when it raises the x^2-weighted fit, for up to 5 passes
    over the group, stopping after a pass with no change. A pass without change leaves the state as it was, so
    groups that stopped are simply left out of later passes. Returns (scale (G,), levels (16, G) int32 in
    [0, 2*nmax)).
    """
    amax, signed_max = _group_absmax(x)
    zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    weights = x * x
    x_weighted = weights * x
    levels = _levels(x, divide(float(-nmax), signed_max), nmax)
    sumlx, suml2 = _weighted_sums(x, weights, levels)

    active = torch.arange(x.shape[1], device=x.device)
    for _ in range(max_passes):
        if active.numel() == 0:
            break
        if active.numel() == x.shape[1]:
            sub_x, sub_w, sub_wx, sub_levels = x, weights, x_weighted, levels
        else:
            sub_x, sub_w, sub_wx, sub_levels = x[:, active], weights[:, active], x_weighted[:, active], levels[:, active]
        sub_sumlx, sub_suml2 = sumlx[active], suml2[active]
        changed = torch.zeros(active.shape, dtype=torch.bool, device=x.device)
        for i in range(GROUP):
            level = sub_levels[i]
            slx = sub_sumlx - sub_wx[i] * level
            sl2 = sub_suml2 - (sub_w[i] * level) * level
            new_level = nearest_int(sub_x[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
            accept = (slx > 0) & (new_level != level)
            slx += sub_wx[i] * new_level
            sl2 += (sub_w[i] * new_level) * new_level
            accept &= (sl2 > 0) & ((slx * slx) * sub_suml2 > (sub_sumlx * sub_sumlx) * sl2)
            sub_levels[i] = torch.where(accept, new_level, level)
            sub_sumlx = torch.where(accept, slx, sub_sumlx)
            sub_suml2 = torch.where(accept, sl2, sub_suml2)
            changed |= accept
        if sub_levels is not levels:
            levels[:, active] = sub_levels
        sumlx[active], suml2[active] = sub_sumlx, sub_suml2
        active = active[changed]

    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    levels = (levels + nmax).to(torch.int32)
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, levels


def _requantize(x: torch.Tensor, levels: torch.Tensor, group_d: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml's second pass: levels from the stored (fp16 d) * (integer scale); groups whose product is 0 keep the
    levels of the search."""
    requantized = nearest_int(x / group_d).clamp_(-nmax, nmax - 1) + nmax
    return torch.where(group_d != 0, requantized, levels)


def _bit_fields(values: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """OR of values[k] << (width*k) along dim (fields do not overlap, so a sum is the OR)."""
    count = values.shape[dim]
    shape = [1] * values.dim()
    shape[dim] = count
    shifts = (torch.arange(count, dtype=torch.int32, device=values.device) * width).reshape(shape)
    return (values << shifts).sum(dim=dim, dtype=torch.int32)


def _split_bit_fields(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of _bit_fields with dim=-2: (..., n) -> (..., count, n)."""
    shifts = (torch.arange(count, dtype=torch.int32, device=packed.device) * width).reshape(count, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _in_chunks(encode, rows: torch.Tensor, importance: Optional[torch.Tensor], block_bytes: int) -> torch.Tensor:
    n_rows, n_per_row = rows.shape
    output = torch.empty((n_rows, n_per_row // QK_K * block_bytes), dtype=torch.uint8, device=rows.device)
    for chunk in row_chunks(n_rows, n_per_row, CHUNK_VALUES):
        output[chunk] = encode(rows[chunk], importance)
    return output


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
    levels = _requantize(x, levels, group_d, 32)

    levels = _from_group_major(levels).reshape(n_rows, n_blocks, 2, 4, 32)
    levels = torch.where(zero_block.reshape(n_rows, n_blocks, 1, 1, 1), torch.zeros_like(levels), levels)
    low, high = levels & 0xF, levels >> 4
    ql = torch.cat([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], dim=-1)
    qh = _bit_fields(high, 2, dim=-2)
    return torch.cat([
        ql.reshape(n_rows, n_blocks, 128).to(torch.uint8),
        qh.reshape(n_rows, n_blocks, 64).to(torch.uint8),
        (codes & 0xFF).to(torch.uint8),
        fp16_bytes(d_raw),
    ], dim=-1).reshape(n_rows, -1)


def quantize_q6_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return _in_chunks(_encode_q6_k, rows, importance, Q6_K_BLOCK_BYTES)


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

def _encode_q3_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
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
        codes = torch.where(nonzero.unsqueeze(-1), codes, torch.zeros_like(codes))
        d_raw = torch.where(nonzero, divide(1.0, iscale), torch.zeros_like(iscale))
    else:
        # quantize_row_q3_K_impl: weights imatrix * sqrt(sigma2 + x^2), then the group scales fitted by
        # make_qx_quants weighted by each group's total weight
        squares = (rows * rows).reshape(n_rows, n_blocks, QK_K).permute(2, 0, 1)
        sigma2 = (sequential_sum(squares) * 2) / QK_K
        sigma2 = sigma2.repeat_interleave(GROUPS_PER_BLOCK, dim=-1)
        weights = importance.reshape(-1, GROUP).t().unsqueeze(1) * exact_sqrt(sigma2 + x * x)
        group_weights = sequential_sum(weights)
        scales, levels = make_qx_quants(x, 4, weights)
        d_raw, codes = make_qx_quants(
            scales.reshape(n_rows, n_blocks, GROUPS_PER_BLOCK).permute(2, 0, 1),
            32,
            group_weights.reshape(n_rows, n_blocks, GROUPS_PER_BLOCK).permute(2, 0, 1),
        )
        codes = codes.permute(1, 2, 0)
    group_d = (fp16_round(d_raw).unsqueeze(-1) * (codes - 32).to(torch.float32)).reshape(n_rows, -1)
    levels = _requantize(x, levels, group_d, 4)

    levels = _from_group_major(levels).reshape(n_rows, n_blocks, QK_K)
    hmask = _bit_fields((levels >> 2).reshape(n_rows, n_blocks, 8, 32), 1, dim=-2)
    qs = _bit_fields((levels & 3).reshape(n_rows, n_blocks, 2, 4, 32), 2, dim=-2)
    scale_low = (codes[..., :8] & 0xF) | ((codes[..., 8:] & 0xF) << 4)
    scale_high = _bit_fields((codes >> 4).reshape(n_rows, n_blocks, 4, 4), 2, dim=-2)
    return torch.cat([
        hmask.to(torch.uint8),
        qs.reshape(n_rows, n_blocks, 64).to(torch.uint8),
        scale_low.to(torch.uint8),
        scale_high.to(torch.uint8),
        fp16_bytes(d_raw),
    ], dim=-1).reshape(n_rows, -1)


def quantize_q3_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return _in_chunks(_encode_q3_k, rows, importance, Q3_K_BLOCK_BYTES)


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
