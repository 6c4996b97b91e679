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

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from .codec import Codec
from .common import (
    GROUP_MAX_EPS, divide, fp16_bytes, fp16_round, low_byte, nearest_int, running_sum_from_first, sequential_sum,
)

SUPER_BLOCK = 256  # QK_K
_QP_PASSES = 5  # make_qp_quants' refinement passes (itry)
# Super-blocks per encoding chunk: big enough that per-op overhead is small, small enough that the search's
# working set stays in cache on CPU. CUDA takes far more at once.
_CHUNK_BLOCKS = {"cpu": 2048, "cuda": 1 << 16}


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


def _sum_rows(rows) -> torch.Tensor:
    """common.sequential_sum over rows a buffer was split into once (the search's hot loop reuses its buffers, and
    summing a strided plane through common.sequential_sum would copy it first)."""
    total = rows[0] + 0.0
    for row in rows[1:]:
        total.add_(row)
    return total


def _sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C's sqrtf), as common.exact_sqrt but 14 times faster.

    torch's float32 sqrt on CPU is off by one ulp for about 1 input in 6. The float64 root rounded to float32 is
    already correctly rounded (53 >= 2*24 + 2 bits makes double rounding of a square root harmless), so the
    midpoint correction of common.exact_sqrt never changes it; on a 1 MB tensor that correction costs 8 ms.
    """
    return torch.sqrt(values.to(torch.float64)).to(torch.float32)


def _nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int as the reference library computes it on x86, on every device.

    A NaN made by the arithmetic (0*inf, inf-inf, as when an fp16 scale overflows) is x86's default NaN, whose
    bits the trick turns into 0; CUDA's NaN has other bits, so NaN is mapped to 0 first.
    """
    return nearest_int(torch.nan_to_num(values, nan=0.0, posinf=math.inf, neginf=-math.inf))


_ROUNDING_LIMIT = 4194303.0  # within +-this, round-half-even equals ggml's nearest_int bit trick


def _fit_scale_min(x: torch.Tensor, weights: torch.Tensor, search: _Search):
    """make_qkx2_quants / make_qkx3_quants on every column of x (elements along dimension 0).

    Returns (levels float32 like x, scale, minus_min) where minus_min is the function's *the_min (= -min >= 0).
    """
    nmax = search.nmax
    x_low, highest = x.amin(dim=0), x.amax(dim=0)
    lowest = x_low.clamp(max=0.0)
    degenerate = ~(highest > lowest)  # ggml returns at once: levels 0, scale 0
    # give degenerate columns a harmless range so that no inf/NaN runs through the search; masked at the end
    highest = torch.where(degenerate, lowest.abs() * 2 + 1, highest)
    sum_w = running_sum_from_first(weights)
    sum_x = running_sum_from_first(weights * x)
    numerators = torch.tensor(search.numerators(), dtype=x.dtype, device=x.device)

    n, columns = x.shape
    trial = torch.empty_like(x)
    # w*l, w*l*l and w*l*x of every element side by side, so that one run of additions sums all three
    products = torch.empty((n, 3, columns), dtype=x.dtype, device=x.device)
    product_rows = products.unbind(0)
    # the error terms reuse the first plane once the sums are taken: less memory, fewer cache misses
    diff = products[:, 0]
    diff_rows = [row[0] for row in product_rows]

    def grid_levels(minimum, iscale):
        """MAX(0, MIN(nmax, nearest_int(iscale*(x - minimum)))) into `trial`.

        torch.round is round-half-even like nearest_int wherever |t| <= 4194303. t is monotonic along a column
        and iscale*(max - minimum) is the step's numerator, so the smallest element bounds it; a column outside
        (only possible far from any sane data) sends the whole call to ggml's exact bit trick.
        """
        torch.sub(x, minimum, out=trial)
        trial.mul_(iscale)
        bound = (x_low - minimum).mul_(iscale).abs_().max()
        if bool(bound <= _ROUNDING_LIMIT):
            return trial.round_().clamp_(0, nmax)
        trial.copy_(_nearest_int(trial).clamp_(0, nmax))
        return trial

    def error(levels, scale, minimum):
        torch.mul(levels, scale, out=diff).add_(minimum).sub_(x)
        (diff.abs_() if search.use_mad else diff.mul_(diff)).mul_(weights)
        return _sum_rows(diff_rows)

    iscale = divide(float(nmax), highest - lowest)
    scale = divide(1.0, iscale)
    best_error = error(grid_levels(lowest, iscale), scale, lowest)
    # Rows: error, grid iscale, grid minimum, scale, minimum of the best fit so far. The best levels are not kept
    # but recomputed at the end from the grid (iscale, minimum) that produced them.
    best = torch.stack([best_error, iscale, lowest, scale, lowest])
    candidate = torch.empty_like(best)
    for step in range(numerators.shape[0]):
        minimum = best[4]
        # ggml reuses the best minimum found so far, not the sub-block's own, for the next step's grid
        iscale = torch.div(numerators[step], highest - minimum, out=candidate[1])
        candidate[2].copy_(minimum)
        grid_levels(minimum, iscale)
        weighted = torch.mul(weights, trial, out=products[:, 0])
        torch.mul(weighted, trial, out=products[:, 1])
        torch.mul(weighted, x, out=products[:, 2])
        sum_l, sum_l2, sum_xl = _sum_rows(product_rows)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = torch.div(sum_w * sum_xl - sum_x * sum_l, det, out=candidate[3])
        this_min = torch.div(sum_l2 * sum_x - sum_l * sum_xl, det, out=candidate[4])
        positive_min = this_min > 0
        this_min.masked_fill_(positive_min, 0.0)
        torch.where(positive_min, sum_xl / sum_l2, this_scale, out=this_scale)
        trial_error = candidate[0].copy_(error(trial, this_scale, this_min))
        better = (det > 0) & (trial_error < best[0])
        best = torch.where(better, candidate, best)
    _, best_iscale, best_grid_min, scale, minimum = best
    levels = grid_levels(best_grid_min, best_iscale).masked_fill_(degenerate, 0.0)
    scale = scale.masked_fill(degenerate, 0.0)
    minimum = torch.where(degenerate, lowest, minimum)
    return levels, scale, -minimum


def _fit_level_scale(values: torch.Tensor, nmax: int, weights: torch.Tensor):
    """ggml's make_qp_quants on every column of values (elements along dimension 0): a scale >= 0 and levels 0..nmax.

    Returns (levels as the uint8 values ggml stores, int32, like values; scale float32 per column).
    """
    count = values.shape[0]
    vmax = values.amax(dim=0).clamp_(min=0.0)
    negligible = vmax < GROUP_MAX_EPS
    weighted_values = weights * values  # ggml's w*x[i]*l is (w*x[i])*l

    def weighted_square_error(levels, scale):
        diff = values - scale * levels
        return sequential_sum(weights * diff * diff)

    iscale = divide(float(nmax), vmax)
    first = (_nearest_int(iscale * values) & 0xFF).to(torch.float32)
    best_mse = weighted_square_error(first, divide(1.0, iscale))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        numerator = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        trial_iscale = divide(numerator, vmax)
        trial = _nearest_int(trial_iscale * values).clamp_(max=nmax).to(torch.float32)
        mse = weighted_square_error(trial, divide(1.0, trial_iscale))
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, trial_iscale, iscale)

    chosen = _nearest_int(iscale * values).clamp_(max=nmax)
    levels = (chosen & 0xFF).to(torch.float32)  # the stored uint8 values, exact in float32
    chosen = chosen.to(torch.float32)
    sum_lx = sequential_sum(weighted_values * chosen)
    sum_l2 = sequential_sum(weights * chosen * chosen)
    for _ in range(_QP_PASSES):
        changed = torch.zeros_like(negligible)
        for i in range(count):
            w, wx, current = weights[i], weighted_values[i], levels[i]
            slx = sum_lx - wx * current
            sl2 = sum_l2 - w * current * current
            # wherever slx > 0 and sl2 > 0 (the only places the proposal is used) the quotient is not NaN
            proposed = nearest_int(values[i] * sl2 / slx).clamp_(max=nmax)
            proposed_f = proposed.to(torch.float32)
            candidate = (slx > 0) & (sl2 > 0) & (proposed_f != current)
            slx = slx + wx * proposed_f
            sl2 = sl2 + w * proposed_f * proposed_f
            accept = candidate & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            torch.where(accept, (proposed & 0xFF).to(torch.float32), current, out=current)
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
            changed |= accept
        if not bool(changed.any()):  # a pass that changes nothing leaves the state for the next one unchanged
            break
    levels = levels.to(torch.int32)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    levels = levels.masked_fill_(negligible, 0)
    scale = scale.masked_fill(negligible, 0.0)
    return levels, scale


def _fit_scales_and_mins(scales, mins, sub_weight, n_blocks: int, nmax: int):
    """make_qp_quants of each super-block's sub-block scales and of its minimums (one call for both).

    All inputs are per sub-block, super-block-major (n_blocks * k,). Returns the codes (n_blocks, k) int32 of the
    scales and of the minimums, then their fp32 super-block scales d and dmin (n_blocks,).
    """
    both = torch.cat([scales.reshape(n_blocks, -1), mins.reshape(n_blocks, -1)]).t().contiguous()
    weights = sub_weight.reshape(n_blocks, -1).repeat(2, 1).t().contiguous()
    codes, block_scales = _fit_level_scale(both, nmax, weights)
    codes = codes.t()
    return codes[:n_blocks], codes[n_blocks:], block_scales[:n_blocks], block_scales[n_blocks:]


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
    fresh = _nearest_int((x + dm) / d).clamp_(0, nmax).to(torch.float32)
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
        sum_x2 = sequential_sum(x * x)
        av_x = _sqrt(sum_x2 / 32)
        weights = av_x + x.abs()
        levels, scales, mins = _fit_scale_min(x, weights, search)
        scales, mins = scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = torch.where(max_scale > 0, divide(63.0, max_scale), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, divide(63.0, max_min), torch.zeros_like(max_min))
        ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
        lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
        d, dmin = divide(max_scale, 63.0), divide(max_min, 63.0)
    else:
        sum_x2 = sequential_sum(_block_major(x * x, n_blocks))
        sigma2 = 2 * sum_x2 / SUPER_BLOCK
        sigma2 = sigma2.repeat_interleave(8)
        qw = importance.reshape(n_blocks * 8, 32).t().contiguous()
        weights = qw * _sqrt(sigma2 + x * x)
        sub_weight = sequential_sum(weights)
        levels, scales, mins = _fit_scale_min(x, weights, _search_with_importance(nmax))
        ls, lm, d, dmin = _fit_scales_and_mins(scales, mins, sub_weight, n_blocks, 63)
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
        ls = _nearest_int(divide(15.0, max_scale)[:, None] * scales).masked_fill_(~has_scale[:, None], 0)
        lm = _nearest_int(divide(15.0, max_min)[:, None] * mins).masked_fill_(~has_min[:, None], 0)
        d = divide(max_scale, 15.0).masked_fill_(~has_scale, 0.0)
        dmin = divide(max_min, 15.0).masked_fill_(~has_min, 0.0)
    else:
        sum_x2 = sequential_sum(_block_major(x * x, n_blocks))
        sigma2 = (sum_x2 / SUPER_BLOCK).repeat_interleave(16)
        qw = importance.reshape(n_blocks * 16, 16).t().contiguous()
        weights = qw * _sqrt(sigma2 + x * x)
        sub_weight = sequential_sum(weights)
        levels, scales, mins = _fit_scale_min(x, weights, _SEARCH_Q2_K_IMPORTANCE)
        ls, lm, d, dmin = _fit_scales_and_mins(scales, mins, sub_weight, n_blocks, 15)
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
