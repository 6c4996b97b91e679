"""Q2_K, Q4_K and Q5_K: the affine k-quants (x ~ d*sc*q - dmin*m), byte-identical to ggml_quantize_chunk.

ggml fits a scale and a minimum to every sub-block (make_qkx2_quants without an importance vector,
make_qkx3_quants with one), then quantizes the sub-block scales and minimums against one fp16 pair per 256-element
super-block (directly without importance, through make_qp_quants with it) and finally requantizes every value
against the stored scales. Here each step runs on all sub-blocks at once: a sub-block's elements lie along
dimension 0 of a (n, sub_blocks) tensor, so ggml's left-to-right sums become n vector additions in the same order,
and its per-sub-block branches become masks. Only the loops over a sub-block's elements, over the search steps and
over make_qp_quants' passes are Python loops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from .codec import Codec
from .common import fp16_bytes, fp16_round, low_byte, nearest_int

SUPER_BLOCK = 256  # QK_K
_GROUP_MAX_EPS = float(np.float32(1e-15))
_QP_PASSES = 5  # make_qp_quants' refinement passes (itry)
# Super-blocks per encoding chunk: big enough that per-op overhead is small, small enough that the search's
# working set stays in cache on CPU. CUDA takes far more at once.
_CHUNK_BLOCKS = {"cpu": 512, "cuda": 1 << 16}


@dataclass(frozen=True)
class _Search:
    """Arguments of ggml's make_qkx2_quants / make_qkx3_quants (same algorithm, different callers)."""

    nmax: int
    rmin: float
    rdelta: float
    nstep: int
    use_mad: bool

    def numerators(self) -> list[float]:
        """rmin + rdelta*is + nmax of every step, evaluated in float32 in C's order."""
        rmin, rdelta, nmax = np.float32(self.rmin), np.float32(self.rdelta), np.float32(self.nmax)
        return [float((rmin + rdelta * np.float32(step)) + nmax) for step in range(self.nstep + 1)]


def _sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """C's `float s = 0; for (i...) s += t[i];` along dimension 0, one float32 rounding per addition.

    In place after the first term; equal to common.sequential_sum (0 + t0 == t0 + 0, signed zeros included).
    """
    total = terms[0] + 0.0
    for term in terms[1:]:
        total.add_(term)
    return total


def _running_sum(terms: torch.Tensor) -> torch.Tensor:
    """C's `float s = t[0]; for (i = 1...) s += t[i];` along dimension 0 (no leading 0 + t0)."""
    total = terms[0].clone()
    for term in terms[1:]:
        total.add_(term)
    return total


def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C's sqrtf).

    torch's float32 sqrt on CPU is not correctly rounded (about 1 result in 6 is off by one ulp); the float64 root
    rounded to float32 is, since float64 has more than twice float32's precision.
    """
    return torch.sqrt(values.to(torch.float64)).to(torch.float32)


def _divide(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as an IEEE float32 division (Python's `c / t` is reciprocal-then-multiply)."""
    return torch.full_like(denominator, numerator) / denominator


def _over(values: torch.Tensor, divisor: float) -> torch.Tensor:
    """values / divisor as an IEEE division on every device (CUDA multiplies by the reciprocal of a host scalar)."""
    return values / torch.full_like(values, divisor)


_ROUNDING_MAGIC = 12582912.0  # 1.5 * 2**23, the constant of ggml's nearest_int
_ROUNDING_LIMIT = 4194303.0  # within +-this, (t + magic) - magic is exactly nearest_int(t)


def _grid_levels(x, extremes, minimum, iscale, nmax: int, skip: torch.Tensor) -> torch.Tensor:
    """MAX(0, MIN(nmax, nearest_int(iscale*(x - minimum)))) as float32, columns in `skip` left unspecified.

    extremes: (smallest, largest) element of each column.

    The float form (t + magic) - magic costs two operations and no integer round trip; it equals ggml's bit trick
    wherever |t| <= 4194303. t is monotonic along a column, so bounding it at the column's extremes proves that
    for every element; a column outside (possible only for extreme outliers) sends the whole call to the bit trick.
    """
    low = (extremes[0] - minimum) * iscale
    high = (extremes[1] - minimum) * iscale
    in_range = (low.abs() <= _ROUNDING_LIMIT) & (high.abs() <= _ROUNDING_LIMIT)
    scaled = (x - minimum).mul_(iscale)
    if bool((in_range | skip).all()):
        return scaled.add_(_ROUNDING_MAGIC).sub_(_ROUNDING_MAGIC).clamp_(0, nmax)
    return nearest_int(scaled).clamp_(0, nmax).to(torch.float32)


def _fit_scale_min(x: torch.Tensor, weights: torch.Tensor, search: _Search):
    """make_qkx2_quants / make_qkx3_quants on every column of x (elements along dimension 0).

    Returns (levels float32 like x, scale, minus_min) where minus_min is the function's *the_min (= -min >= 0).
    """
    nmax = search.nmax
    extremes = torch.aminmax(x, dim=0)
    highest = extremes.max
    lowest = extremes.min.clamp(max=0.0)
    degenerate = ~(highest > lowest)  # ggml: max == min -> all levels 0, scale 0
    sum_w = _running_sum(weights)
    sum_x = _running_sum(weights * x)
    # w*l, w*l*l and w*l*x of every element side by side, so that one run of additions sums all three
    products = torch.empty((x.shape[0], 3, x.shape[1]), dtype=x.dtype, device=x.device)

    def error(levels, scale, minimum):
        diff = (scale * levels).add_(minimum).sub_(x)
        diff = diff.abs_() if search.use_mad else diff.mul_(diff)
        return _sequential_sum(diff.mul_(weights))

    iscale = _divide(float(nmax), highest - lowest)
    scale = _divide(1.0, iscale)
    best_error = error(_grid_levels(x, extremes, lowest, iscale, nmax, degenerate), scale, lowest)
    # the best levels are recomputed at the end from the grid (iscale, minimum) that produced them
    best_iscale, best_grid_min = iscale, lowest
    minimum = lowest
    for numerator in search.numerators():
        # ggml reuses the best minimum found so far, not the sub-block's own, for the next step's grid
        iscale = _divide(numerator, highest - minimum)
        trial = _grid_levels(x, extremes, minimum, iscale, nmax, degenerate)
        weighted = torch.mul(weights, trial, out=products[:, 0])
        torch.mul(weighted, trial, out=products[:, 1])
        torch.mul(weighted, x, out=products[:, 2])
        sum_l, sum_l2, sum_xl = _sequential_sum(products)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive_min = this_min > 0
        this_min = this_min.masked_fill_(positive_min, 0.0)
        this_scale = torch.where(positive_min, sum_xl / sum_l2, this_scale)
        trial_error = error(trial, this_scale, this_min)
        better = (det > 0) & (trial_error < best_error)
        best_error = torch.where(better, trial_error, best_error)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_grid_min = torch.where(better, minimum, best_grid_min)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    levels = _grid_levels(x, extremes, best_grid_min, best_iscale, nmax, degenerate).masked_fill_(degenerate, 0.0)
    scale = scale.masked_fill(degenerate, 0.0)
    minimum = torch.where(degenerate, lowest, minimum)
    return levels, scale, -minimum


def _fit_level_scale(values: torch.Tensor, nmax: int, weights: torch.Tensor):
    """ggml's make_qp_quants on every column of values (elements along dimension 0): a scale >= 0 and levels 0..nmax.

    Returns (levels as the uint8 values ggml stores, int32, like values; scale float32 per column).
    """
    count = values.shape[0]
    vmax = values.amax(dim=0).clamp_(min=0.0)
    negligible = vmax < _GROUP_MAX_EPS

    iscale = _divide(float(nmax), vmax)
    first = (nearest_int(iscale * values) & 0xFF).to(torch.float32)
    scale = _divide(1.0, iscale)
    diff = values - scale * first
    best_mse = _sequential_sum(weights * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        numerator = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        trial_iscale = _divide(numerator, vmax)
        trial_scale = _divide(1.0, trial_iscale)
        trial = nearest_int(trial_iscale * values).clamp_(max=nmax).to(torch.float32)
        diff = values - trial_scale * trial
        mse = _sequential_sum(weights * diff * diff)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, trial_iscale, iscale)

    chosen = nearest_int(iscale * values).clamp_(max=nmax)
    levels = chosen & 0xFF
    chosen = chosen.to(torch.float32)
    sum_lx = _sequential_sum(weights * values * chosen)
    sum_l2 = _sequential_sum(weights * chosen * chosen)
    for _ in range(_QP_PASSES):
        changed = torch.zeros_like(negligible)
        for i in range(count):
            w, x, stored = weights[i], values[i], levels[i]
            current = stored.to(torch.float32)
            slx = sum_lx - w * x * current
            sl2 = sum_l2 - w * current * current
            proposed = nearest_int(x * sl2 / slx).clamp_(max=nmax)
            candidate = (slx > 0) & (sl2 > 0) & (proposed != stored)
            proposed_f = proposed.to(torch.float32)
            slx = slx + w * x * proposed_f
            sl2 = sl2 + w * proposed_f * proposed_f
            accept = candidate & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            levels[i] = torch.where(accept, proposed & 0xFF, stored)
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
            changed |= accept
        if not bool(changed.any()):  # a pass that changes nothing leaves the state for the next one unchanged
            break
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    levels = levels.masked_fill_(negligible, 0)
    scale = scale.masked_fill(negligible, 0.0)
    return levels, scale


def _block_major(columns: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(n, n_blocks*k) sub-block columns -> (n*k, n_blocks): each super-block's elements in memory order."""
    n = columns.shape[0]
    return columns.reshape(n, n_blocks, -1).permute(2, 0, 1).reshape(-1, n_blocks)


def _positive_max(values: torch.Tensor) -> torch.Tensor:
    """ggml's `m = 0; if (v > m) m = v;` over each row: +0.0 (never -0.0) when no value is positive."""
    highest = values.amax(dim=1)
    return torch.where(highest > 0, highest, torch.zeros_like(highest))


def _requantize(x, levels, d, dm, nmax):
    """ggml's last pass: l = nearest_int((x + dm)/d) clamped, for sub-blocks whose d is not 0 (others keep levels)."""
    fresh = nearest_int((x + dm) / d).clamp_(0, nmax).to(torch.float32)
    return torch.where(d != 0, fresh, levels)


# ---------------------------------------------------------------- Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales

_SEARCH_Q4_K = _Search(nmax=15, rmin=-1.0, rdelta=0.1, nstep=20, use_mad=False)
_SEARCH_Q5_K = _Search(nmax=31, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=False)


def _search_with_importance(nmax: int) -> _Search:
    return _Search(nmax=nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)


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


def _encode_32(blocks: torch.Tensor, importance: Optional[torch.Tensor], nmax: int, search: _Search):
    """Header, packed scales and levels of Q4_K (nmax 15) or Q5_K (nmax 31) super-blocks.

    blocks: (n_blocks, 256); importance: (n_blocks, 256) or None.
    Returns (header bytes (n_blocks, 4), scales bytes (n_blocks, 12), levels int32 (n_blocks, 256)).
    """
    n_blocks = blocks.shape[0]
    x = blocks.reshape(n_blocks * 8, 32).t().contiguous()
    if importance is None:
        sum_x2 = _sequential_sum(x * x)
        av_x = _sqrt(sum_x2 / 32)
        weights = av_x + x.abs()
        levels, scales, mins = _fit_scale_min(x, weights, search)
        scales, mins = scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = torch.where(max_scale > 0, _divide(63.0, max_scale), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, _divide(63.0, max_min), torch.zeros_like(max_min))
        ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
        lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
        d, dmin = _over(max_scale, 63.0), _over(max_min, 63.0)
    else:
        sum_x2 = _sequential_sum(_block_major(x * x, n_blocks))
        sigma2 = 2 * sum_x2 / SUPER_BLOCK
        sigma2 = sigma2.repeat_interleave(8)
        qw = importance.reshape(n_blocks * 8, 32).t()
        weights = qw * _sqrt(sigma2 + x * x)
        sub_weight = _sequential_sum(weights)
        levels, scales, mins = _fit_scale_min(x, weights, _search_with_importance(nmax))
        sub_weight = sub_weight.reshape(n_blocks, 8).t()
        ls, d = _fit_level_scale(scales.reshape(n_blocks, 8).t().contiguous(), 63, sub_weight)
        lm, dmin = _fit_level_scale(mins.reshape(n_blocks, 8).t().contiguous(), 63, sub_weight)
        ls, lm = ls.t(), lm.t()
        if nmax == 31:  # quantize_row_q5_K_impl clamps the codes, q4_K's does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    packed = _pack_scales_6bit(ls, lm)
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin)], dim=1)
    sc, m = _unpack_scales_6bit(packed)
    d_sub = (fp16_round(d)[:, None] * sc).reshape(-1)
    dm_sub = (fp16_round(dmin)[:, None] * m).reshape(-1)
    levels = _requantize(x, levels, d_sub, dm_sub, nmax)
    return header, packed, levels.t().reshape(n_blocks, SUPER_BLOCK).to(torch.int32)


def _pairs_of_32(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels (n_blocks, 256) -> (first, second) halves of each 64-element chunk, (n_blocks, 4, 32) each."""
    chunks = levels.reshape(-1, 4, 2, 32)
    return chunks[:, :, 0, :], chunks[:, :, 1, :]


def _quantize_q4_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    def encode(blocks, block_importance):
        header, scales, levels = _encode_32(blocks, block_importance, 15, _SEARCH_Q4_K)
        first, second = _pairs_of_32(levels)
        qs = low_byte(first | (second << 4)).reshape(-1, 128)
        return torch.cat([header, scales, qs], dim=1)

    return _by_chunks(rows, importance, encode)


def _quantize_q5_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    def encode(blocks, block_importance):
        header, scales, levels = _encode_32(blocks, block_importance, 31, _SEARCH_Q5_K)
        first, second = _pairs_of_32(levels)
        qs = low_byte((first & 0xF) | ((second & 0xF) << 4)).reshape(-1, 128)
        # bit 4 of element 64*c + 32*h + j goes to bit 2*c + h of qh[j]
        high = (levels.reshape(-1, 8, 32) >> 4) & 1
        shifts = torch.arange(8, device=levels.device, dtype=torch.int32)[None, :, None]
        qh = low_byte((high << shifts).sum(dim=1, dtype=torch.int32))
        return torch.cat([header, scales, qh, qs], dim=1)

    return _by_chunks(rows, importance, encode)


# ---------------------------------------------------------------- Q2_K: 16 sub-blocks of 16, 4-bit scales

_SEARCH_Q2_K = _Search(nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
_SEARCH_Q2_K_IMPORTANCE = _search_with_importance(3)


def _quantize_q2_k(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return _by_chunks(rows, importance, _encode_q2_k)


def _encode_q2_k(blocks: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    n_blocks = blocks.shape[0]
    x = blocks.reshape(n_blocks * 16, 16).t().contiguous()
    if importance is None:
        levels, scales, mins = _fit_scale_min(x, x.abs(), _SEARCH_Q2_K)
        scales, mins = scales.reshape(n_blocks, 16), mins.reshape(n_blocks, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        has_scale, has_min = max_scale > 0, max_min > 0
        ls = nearest_int(_divide(15.0, max_scale)[:, None] * scales).masked_fill_(~has_scale[:, None], 0)
        lm = nearest_int(_divide(15.0, max_min)[:, None] * mins).masked_fill_(~has_min[:, None], 0)
        d = _over(max_scale, 15.0).masked_fill_(~has_scale, 0.0)
        dmin = _over(max_min, 15.0).masked_fill_(~has_min, 0.0)
    else:
        sum_x2 = _sequential_sum(_block_major(x * x, n_blocks))
        sigma2 = (sum_x2 / SUPER_BLOCK).repeat_interleave(16)
        qw = importance.reshape(n_blocks * 16, 16).t()
        weights = qw * _sqrt(sigma2 + x * x)
        sub_weight = _sequential_sum(weights).reshape(n_blocks, 16).t()
        levels, scales, mins = _fit_scale_min(x, weights, _SEARCH_Q2_K_IMPORTANCE)
        ls, d = _fit_level_scale(scales.reshape(n_blocks, 16).t().contiguous(), 15, sub_weight)
        lm, dmin = _fit_level_scale(mins.reshape(n_blocks, 16).t().contiguous(), 15, sub_weight)
        ls, lm = ls.t(), lm.t()
    packed = low_byte(ls | (lm << 4))
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin)], dim=1)
    codes = packed.to(torch.int32)
    d_sub = (fp16_round(d)[:, None] * (codes & 0xF)).reshape(-1)
    dm_sub = (fp16_round(dmin)[:, None] * (codes >> 4)).reshape(-1)
    levels = _requantize(x, levels, d_sub, dm_sub, 3).t().reshape(n_blocks, 2, 4, 32).to(torch.int32)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.int32)[None, None, :, None]
    qs = low_byte((levels << shifts).sum(dim=2, dtype=torch.int32)).reshape(n_blocks, 64)
    return torch.cat([packed, qs, header], dim=1)


# ---------------------------------------------------------------- shared driver and decoders


def _by_chunks(rows: torch.Tensor, importance: Optional[torch.Tensor], encode) -> torch.Tensor:
    """Run encode(blocks, block_importance) -> (n_blocks, block_bytes) over all super-blocks, a chunk at a time."""
    n_rows, n_per_row = rows.shape
    per_row = n_per_row // SUPER_BLOCK
    blocks = rows.reshape(-1, SUPER_BLOCK)
    per_block = None if importance is None else importance.reshape(per_row, SUPER_BLOCK)
    chunk = _CHUNK_BLOCKS.get(rows.device.type, _CHUNK_BLOCKS["cuda"])
    pieces = []
    for start in range(0, blocks.shape[0], chunk):
        part = blocks[start:start + chunk]
        part_importance = None
        if per_block is not None:
            index = torch.arange(start, start + part.shape[0], device=rows.device) % per_row
            part_importance = per_block.index_select(0, index)
        pieces.append(encode(part, part_importance))
    return torch.cat(pieces, dim=0).reshape(n_rows, -1)


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
    QType.Q2_K: Codec(_quantize_q2_k, _dequantize_q2_k, uses_importance=True),
    QType.Q4_K: Codec(_quantize_q4_k, _dequantize_q4_k, uses_importance=True),
    QType.Q5_K: Codec(_quantize_q5_k, _dequantize_q5_k, uses_importance=True),
}
