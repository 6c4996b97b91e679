"""Fused Triton kernels for Q8_0, Q4_K and Q5_K on CUDA: one launch per tensor, bytes identical to ggml_quantize_chunk.

The torch codecs run ggml's algorithms as many small elementwise kernels; here each GPU thread runs the C code of
one block (Q8_0) or one 32-value sub-block (Q4_K, Q5_K) start to end, with the values in registers. Byte identity
with ggml's scalar x86 build (see ggml_arithmetic.py) rests on:
- every sum is a chain of additions in ggml's order: a loop over the 32 values (tl.static_range, one value of every
  sub-block per iteration), never tl.sum on floats; tl.sum only gathers integers or one non-zero term;
- kernels are launched with enable_fp_fusion=False, so no multiply-add is contracted into an FMA;
- divisions go through tl.math.div_rn and roots through tl.sqrt_rn (`/` lowers to the approximate div.full.f32);
- nearest_int is ggml's own float trick, and roundf is emulated as round_half_away in ggml_arithmetic.py does;
- constants that ggml computes in float32 (0.1f*is + nmax) are computed on float32 tensors, never folded by Python.

A kernel raises a flag instead of matching inputs outside its scope: non-finite values, and NaN in a block scale
(where x86 and the GPU give NaN different signs). quantize() then returns None and the caller uses the torch codecs.
Offsets are int32 within a program; each program's base is offset in int64, so tensors may exceed 2**31 bytes.
Sizes are not specialised on (one compilation per kernel and type, whatever the tensors' shapes).
On a CPU, TRITON_INTERPRET=1 set before this module is imported runs the same kernels through Triton's interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType

from .ggml_arithmetic import FLT_MAX
from .scale_search import GROUP_MAX_EPS, SEARCH_Q4_K, SEARCH_Q5_K, SEARCH_WITH_IMPORTANCE

# tuples of tensors inside kernels (the values of a sub-block are held as one) came with Triton 3.3
if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 3):
    raise ImportError(f"the fused quantizers need triton >= 3.3, found {triton.__version__}")

TYPES = (QType.Q8_0, QType.Q4_K, QType.Q5_K)

_FLT_MAX = tl.constexpr(FLT_MAX)
_GROUP_MAX_EPS = tl.constexpr(GROUP_MAX_EPS)  # make_qp_quants stores a group below it as zeros

# Blocks of 32 values per program of the Q8_0 kernel, super-blocks of 256 per program of the k-quant kernel (8
# sub-blocks each, so 128 threads of 4 warps hold one sub-block each).
_Q8_0_BLOCKS = 32
_K_SUPERS = 16
# every launch: no multiply-add contraction (ggml rounds each product), 4 warps
COMPILE_OPTIONS = dict(enable_fp_fusion=False, num_warps=4)

# make_qkx2_quants' search without importance, make_qkx3_quants' with it: the torch encoders' arguments
_NMAX = {QType.Q4_K: 15, QType.Q5_K: 31}
_SEARCH = {QType.Q4_K: SEARCH_Q4_K, QType.Q5_K: SEARCH_Q5_K}


# ---------------------------------------------------------------- ggml's scalar helpers

@triton.jit
def _nearest_int(value):
    """ggml's nearest_int: the low mantissa bits of value + 1.5*2**23, as int32; 0 for NaN, as on x86 (whose NaN
    from invalid operations has an empty payload, where the GPU's canonical NaN would read as 4194303)."""
    shifted = (value + 12582912.0).to(tl.int32, bitcast=True)
    return tl.where(value == value, (shifted & 0x007FFFFF) - 0x00400000, 0)


@triton.jit
def _clamped_level(value, top: tl.constexpr):
    """MAX(0, MIN(top, nearest_int(value))) as float32."""
    return tl.minimum(tl.maximum(_nearest_int(value), 0), top).to(tl.float32)


@triton.jit
def _round_half_away(value):
    """C's (int)roundf(value) for finite values: add the float just below 0.5 with value's sign, truncate."""
    return (value + tl.where(value < 0, -0.49999997, 0.49999997)).to(tl.int32)


@triton.jit
def _outside_finite(value):
    """1 where value is NaN or infinite, else 0 (int32)."""
    return (~(tl.abs(value) <= _FLT_MAX)).to(tl.int32)


@triton.jit
def _raise_flag(flag_pointer, count):
    """Mark the launch as outside the kernels' scope when count (a scalar) is not 0."""
    tl.store(flag_pointer, 1, mask=count != 0)


@triton.jit
def _fp16_bits(value):
    """The bits of ggml's fp16 of value (round to nearest even, overflow to infinity) as int32 0..65535."""
    return value.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _float32(constant):
    """A float32 tensor of a constant, so that arithmetic on it is float32 as in C (Python would use doubles)."""
    return tl.full((), constant, tl.float32)


# ---------------------------------------------------------------- moving values between layouts

@triton.jit
def _stack(parts, n: tl.constexpr):
    """The (S, n) table whose column k is parts[k] (S,) (selections only, so values pass unchanged)."""
    index = tl.arange(0, n)[None, :]
    table = tl.where(index == 0, parts[0][:, None], parts[1][:, None])
    for k in tl.static_range(2, n):
        table = tl.where(index == k, parts[k][:, None], table)
    return table


@triton.jit
def _column(table, j: tl.constexpr):
    """Column j of a (super-blocks, 8) float table, exactly (one non-zero integer term per row)."""
    sub = tl.arange(0, 8)[None, :]
    bits = tl.where(sub == j, table.to(tl.int32, bitcast=True), 0)
    return tl.sum(bits, axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _columns(table):
    columns = ()
    for j in tl.static_range(8):
        columns = columns + (_column(table, j),)
    return columns


@triton.jit
def _unstack32(tile):
    """(S, 8, 32) -> the tuple of its 32 (S, 8) slices along the last dimension, in order (register moves only)."""
    # element l = 16*b4 + 8*b3 + 4*b2 + 2*b1 + b0; each split takes the last dimension, so it goes first as b4
    parts = (tl.permute(tl.reshape(tile, (tile.shape[0], 8, 2, 2, 2, 2, 2)), (0, 1, 6, 5, 4, 3, 2)),)
    for level in tl.static_range(5):
        halves = ()
        for p in tl.static_range(2 ** level):
            low, high = tl.split(parts[p])
            halves = halves + (low, high)
        parts = halves
    return parts


# ---------------------------------------------------------------- Q8_0

@triton.jit(do_not_specialize=["n_blocks"])
def _q8_0_kernel(x_pointer, out_pointer, flag_pointer, n_blocks, BLOCKS: tl.constexpr):
    """quantize_row_q8_0_ref: d = amax/127 per block of 32, codes roundf(x/d); BLOCKS blocks per program."""
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    x_pointer += first * 32
    out_pointer += first * 34
    block = tl.arange(0, BLOCKS)
    column = tl.arange(0, 32)
    valid = block < n_blocks - first
    x = tl.load(x_pointer + block[:, None] * 32 + column[None, :], mask=valid[:, None], other=0.0)
    _raise_flag(flag_pointer, tl.sum(tl.sum(_outside_finite(x), axis=1), axis=0))
    # for finite values the largest magnitude does not depend on the scan's order
    amax = tl.max(tl.abs(x), axis=1)
    d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    inverse = tl.where(d != 0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d), 0.0)
    codes = _round_half_away(x * inverse[:, None])
    d_bits = _fp16_bits(d)
    header = _stack((d_bits & 0xFF, d_bits >> 8), 2)
    tl.store(out_pointer + block[:, None] * 34 + tl.arange(0, 2)[None, :], header.to(tl.uint8), mask=valid[:, None])
    tl.store(out_pointer + block[:, None] * 34 + 2 + column[None, :], (codes & 0xFF).to(tl.uint8),
             mask=valid[:, None])


# ---------------------------------------------------------------- Q4_K and Q5_K

@triton.jit
def _fit_scale_and_min(x, w, NMAX: tl.constexpr, RMIN: tl.constexpr, RDELTA: tl.constexpr, NSTEP: tl.constexpr):
    """ggml's make_qkx2_quants / make_qkx3_quants (one algorithm, see scale_search.make_qkx_quants) of every sub-block.

    x, w: tuples of the 32 values and weights, each a tensor over sub-blocks. Returns (scale, the_min) as ggml
    returns them, and the (iscale, minimum) of the grid whose levels ggml keeps in L, with a mask of the flat
    sub-blocks (ggml returns at once: levels 0), so that the caller recomputes those levels instead of holding them.
    """
    lowest = x[0]
    highest = x[0]
    sum_w = w[0]
    sum_x = w[0] * x[0]
    for i in tl.static_range(1, 32):
        lowest = tl.where(x[i] < lowest, x[i], lowest)
        highest = tl.where(x[i] > highest, x[i], highest)
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    lowest = tl.where(lowest > 0, 0.0, lowest)
    flat = highest <= lowest
    # flat sub-blocks get a harmless range; their results are replaced at the end
    highest = tl.where(flat, lowest + 1.0, highest)
    iscale = tl.math.div_rn(tl.full(lowest.shape, NMAX, tl.float32), highest - lowest)
    scale = tl.math.div_rn(tl.full(lowest.shape, 1.0, tl.float32), iscale)
    best_error = tl.zeros(lowest.shape, tl.float32)
    for i in tl.static_range(32):
        level = _clamped_level(iscale * (x[i] - lowest), NMAX)
        diff = scale * level + lowest - x[i]
        best_error = best_error + w[i] * (diff * diff)
    best_iscale = iscale
    best_grid_min = lowest
    best_scale = scale
    best_min = lowest
    for step in range(NSTEP + 1):
        numerator = (_float32(RMIN) + _float32(RDELTA) * step) + NMAX
        trial_iscale = tl.math.div_rn(tl.full(lowest.shape, 1.0, tl.float32) * numerator, highest - best_min)
        sum_l = tl.zeros(lowest.shape, tl.float32)
        sum_l2 = tl.zeros(lowest.shape, tl.float32)
        sum_xl = tl.zeros(lowest.shape, tl.float32)
        levels = ()
        for i in tl.static_range(32):
            level = _clamped_level(trial_iscale * (x[i] - best_min), NMAX)
            weighted = w[i] * level
            sum_l = sum_l + weighted
            sum_l2 = sum_l2 + weighted * level
            sum_xl = sum_xl + weighted * x[i]
            levels = levels + (level,)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive_min = this_min > 0
        this_min = tl.where(positive_min, 0.0, this_min)
        this_scale = tl.where(positive_min, tl.math.div_rn(sum_xl, sum_l2), this_scale)
        error = tl.zeros(lowest.shape, tl.float32)
        for i in tl.static_range(32):
            diff = this_scale * levels[i] + this_min - x[i]
            error = error + w[i] * (diff * diff)
        better = (det > 0) & (error < best_error)
        best_error = tl.where(better, error, best_error)
        best_grid_min = tl.where(better, best_min, best_grid_min)
        best_iscale = tl.where(better, trial_iscale, best_iscale)
        best_scale = tl.where(better, this_scale, best_scale)
        best_min = tl.where(better, this_min, best_min)
    scale = tl.where(flat, 0.0, best_scale)
    the_min = -tl.where(flat, lowest, best_min)
    return scale, the_min, best_iscale, best_grid_min, flat


@triton.jit
def _make_qp_quants(values, weights, NMAX: tl.constexpr):
    """ggml's make_qp_quants(8, NMAX, values, L, weights) per super-block (tuples of 8 tensors over super-blocks).

    Returns (codes, the tuple of the 8 uint8 values ggml stores in L as int32; scale). A refinement pass that
    changes nothing leaves the state as it was, so running all 5 passes equals ggml's early exit.
    """
    vmax = tl.zeros(values[0].shape, tl.float32)
    for i in tl.static_range(8):
        vmax = tl.where(vmax > values[i], vmax, values[i])
    negligible = vmax < _GROUP_MAX_EPS
    vmax = tl.where(negligible, 1.0, vmax)
    iscale = tl.math.div_rn(tl.full(vmax.shape, NMAX, tl.float32), vmax)
    scale = tl.math.div_rn(tl.full(vmax.shape, 1.0, tl.float32), iscale)
    best_mse = tl.zeros(vmax.shape, tl.float32)
    for i in tl.static_range(8):
        level = (_nearest_int(iscale * values[i]) & 0xFF).to(tl.float32)
        diff = values[i] - scale * level
        best_mse = best_mse + weights[i] * diff * diff
    for step in tl.static_range(-4, 5):
        if step != 0:
            numerator = _float32(0.1) * step + NMAX
            trial_iscale = tl.math.div_rn(tl.full(vmax.shape, 1.0, tl.float32) * numerator, vmax)
            trial_scale = tl.math.div_rn(tl.full(vmax.shape, 1.0, tl.float32), trial_iscale)
            mse = tl.zeros(vmax.shape, tl.float32)
            for i in tl.static_range(8):
                level = tl.minimum(_nearest_int(trial_iscale * values[i]), NMAX).to(tl.float32)
                diff = values[i] - trial_scale * level
                mse = mse + weights[i] * diff * diff
            better = mse < best_mse
            best_mse = tl.where(better, mse, best_mse)
            iscale = tl.where(better, trial_iscale, iscale)
    sum_lx = tl.zeros(vmax.shape, tl.float32)
    sum_l2 = tl.zeros(vmax.shape, tl.float32)
    codes = ()
    for i in tl.static_range(8):
        level = tl.minimum(_nearest_int(iscale * values[i]), NMAX)
        codes = codes + (level & 0xFF,)
        level_f = level.to(tl.float32)
        sum_lx = sum_lx + weights[i] * values[i] * level_f
        sum_l2 = sum_l2 + weights[i] * level_f * level_f
    for _ in tl.static_range(5):
        for i in tl.static_range(8):
            current = codes[i].to(tl.float32)
            weighted_value = weights[i] * values[i]
            slx = sum_lx - weighted_value * current
            sl2 = sum_l2 - weights[i] * current * current
            proposed = tl.minimum(_nearest_int(tl.math.div_rn(values[i] * sl2, slx)), NMAX)
            proposed_f = proposed.to(tl.float32)
            candidate = (slx > 0) & (sl2 > 0) & (proposed != codes[i])
            slx = slx + weighted_value * proposed_f
            sl2 = sl2 + weights[i] * proposed_f * proposed_f
            accept = candidate & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            sum_lx = tl.where(accept, slx, sum_lx)
            sum_l2 = tl.where(accept, sl2, sum_l2)
            updated = ()
            for k in tl.static_range(8):
                if k == i:
                    updated = updated + (tl.where(accept, proposed & 0xFF, codes[k]),)
                else:
                    updated = updated + (codes[k],)
            codes = updated
    scale = tl.where(sum_l2 > 0, tl.math.div_rn(sum_lx, sum_l2), 0.0)
    scale = tl.where(negligible, 0.0, scale)
    cleared = ()
    for i in tl.static_range(8):
        cleared = cleared + (tl.where(negligible, 0, codes[i]),)
    return cleared, scale


@triton.jit
def _sub_block_codes(values, top: tl.constexpr):
    """The *_ref encoders' codes of the 8 sub-block scales (or minimums): `if (v > max) max = v` from 0, codes
    MIN(top, (uint8_t)nearest_int(top/max * v)) (0 when max is 0), block scale max/top."""
    highest = tl.zeros(values[0].shape, tl.float32)
    for i in tl.static_range(8):
        highest = tl.where(values[i] > highest, values[i], highest)
    inverse = tl.where(highest > 0, tl.math.div_rn(tl.full(highest.shape, top, tl.float32), highest), 0.0)
    codes = ()
    for i in tl.static_range(8):
        codes = codes + (tl.minimum(_nearest_int(inverse * values[i]) & 0xFF, top),)
    return codes, tl.math.div_rn(highest, tl.full(highest.shape, top, tl.float32))


@triton.jit(do_not_specialize=["n_supers", "supers_per_row"])
def _affine_k_kernel(x_pointer, importance_pointer, out_pointer, flag_pointer, n_supers, supers_per_row,
                     NMAX: tl.constexpr, RMIN: tl.constexpr, RDELTA: tl.constexpr, NSTEP: tl.constexpr,
                     WEIGHTED: tl.constexpr, BLOCK_BYTES: tl.constexpr, SUPERS: tl.constexpr):
    """Q4_K (NMAX 15, 144-byte blocks) or Q5_K (NMAX 31, 176 bytes): quantize_row_q*_K_ref, or with WEIGHTED the
    importance-weighted quantize_row_q*_K_impl.

    Threads hold sub-blocks: the search runs on (SUPERS, 8) tensors, one row per super-block, and the steps ggml
    takes per super-block on (SUPERS,) tensors, one per sub-block column. Memory is read and written as whole
    tiles: Triton's coalescing pass costs time per memory operation times the kernel's size, and 32 loads per
    sub-block made compiling take minutes.
    """
    first = tl.program_id(0).to(tl.int64) * SUPERS
    x_pointer += first * 256
    out_pointer += first * BLOCK_BYTES
    supers = tl.arange(0, SUPERS)
    subs = tl.arange(0, 8)
    valid = supers < n_supers - first
    offsets = supers[:, None, None] * 256 + subs[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]
    x_tile = tl.load(x_pointer + offsets, mask=valid[:, None, None], other=0.0)
    flagged = tl.sum(tl.sum(tl.sum(_outside_finite(x_tile), axis=2), axis=1), axis=0)
    x = _unstack32(x_tile)

    if WEIGHTED:
        # quantize_row_q*_K_impl: sigma2 = 2*sum(x*x)/256 over the whole super-block, left to right. Each
        # sub-block's thread adds its 32 squares to the total so far, of which column j is the next running total.
        squares = ()
        for i in tl.static_range(32):
            squares = squares + (x[i] * x[i],)
        sum_x2 = tl.zeros((SUPERS,), tl.float32)
        for j in tl.static_range(8):
            partial = tl.broadcast_to(sum_x2[:, None], (SUPERS, 8))
            for i in tl.static_range(32):
                partial = partial + squares[i]
            sum_x2 = _column(partial, j)
        sigma2 = tl.math.div_rn(sum_x2 * 2.0, tl.full(sum_x2.shape, 256.0, tl.float32))
        columns = ((first + supers) % supers_per_row).to(tl.int32)[:, None, None] * 256 + offsets % 256
        importance = tl.load(importance_pointer + columns)
        flagged += tl.sum(tl.sum(tl.sum(_outside_finite(importance), axis=2), axis=1), axis=0)
        w = _unstack32(importance * tl.sqrt_rn(sigma2[:, None, None] + x_tile * x_tile))
        sum_w = w[0] + 0.0  # ggml's sum starts at 0.0f
        for i in tl.static_range(1, 32):
            sum_w = sum_w + w[i]
    else:
        # quantize_row_q*_K_ref: weights av_x + |x|, av_x the root mean square of the sub-block
        sum_x2 = tl.zeros((SUPERS, 8), tl.float32)
        for i in tl.static_range(32):
            sum_x2 = sum_x2 + x[i] * x[i]
        av_x = tl.sqrt_rn(tl.math.div_rn(sum_x2, tl.full(sum_x2.shape, 32.0, tl.float32)))
        w = ()
        for i in tl.static_range(32):
            w = w + (av_x + tl.abs(x[i]),)

    scale, the_min, grid_iscale, grid_min, flat = _fit_scale_and_min(x, w, NMAX, RMIN, RDELTA, NSTEP)
    scales = _columns(scale)
    mins = _columns(the_min)
    if WEIGHTED:
        sub_weights = _columns(sum_w)
        ls, d = _make_qp_quants(scales, sub_weights, 63)
        lm, dmin = _make_qp_quants(mins, sub_weights, 63)
        if NMAX == 31:  # quantize_row_q5_K_impl caps the codes at 63, q4_K's does not
            capped_s = ()
            capped_m = ()
            for j in tl.static_range(8):
                capped_s = capped_s + (tl.minimum(ls[j], 63),)
                capped_m = capped_m + (tl.minimum(lm[j], 63),)
            ls = capped_s
            lm = capped_m
    else:
        ls, d = _sub_block_codes(scales, 63)
        lm, dmin = _sub_block_codes(mins, 63)
    for j in tl.static_range(8):
        flagged += tl.sum(((scales[j] != scales[j]) | (mins[j] != mins[j])).to(tl.int32), axis=0)
    flagged += tl.sum(((d != d) | (dmin != dmin)).to(tl.int32), axis=0)
    _raise_flag(flag_pointer, flagged)

    # header: fp16 d and dmin, then the 12 bytes of 6-bit codes
    d_bits = _fp16_bits(d)
    dmin_bits = _fp16_bits(dmin)
    packed = ()
    for j in tl.static_range(4):
        packed = packed + ((ls[j] | ((ls[j + 4] >> 4) << 6)) & 0xFF,)
    for j in tl.static_range(4):
        packed = packed + ((lm[j] | ((lm[j + 4] >> 4) << 6)) & 0xFF,)
    for j in tl.static_range(4):
        packed = packed + (((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)) & 0xFF,)
    header = (d_bits & 0xFF, d_bits >> 8, dmin_bits & 0xFF, dmin_bits >> 8) + packed
    block = out_pointer + supers * BLOCK_BYTES
    tl.store(block[:, None] + tl.arange(0, 16)[None, :], _stack(header, 16).to(tl.uint8), mask=valid[:, None])

    # ggml's get_scale_min_k4 reading the codes back, times the stored fp16 scales
    d_stored = d_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin_stored = dmin_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    d_columns = ()
    dm_columns = ()
    for j in tl.static_range(8):
        if j < 4:
            sc = packed[j] & 63
            m = packed[j + 4] & 63
        else:
            sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4)
            m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
        d_columns = d_columns + (d_stored * sc.to(tl.float32),)
        dm_columns = dm_columns + (dmin_stored * m.to(tl.float32),)
    d_sub = _stack(d_columns, 8)[:, :, None]
    dm_sub = _stack(dm_columns, 8)[:, :, None]

    # the last pass requantizes against the stored scales; sub-blocks whose scale is 0 keep the search's levels
    fresh = _clamped_level(tl.math.div_rn(x_tile + dm_sub, d_sub), NMAX)
    kept = _clamped_level(grid_iscale[:, :, None] * (x_tile - grid_min[:, :, None]), NMAX)
    kept = tl.where(flat[:, :, None], 0.0, kept)
    levels = tl.where(d_sub != 0, fresh, kept).to(tl.int32)
    # byte i of 32-byte chunk c holds element i of sub-block 2c in its low nibble, of sub-block 2c+1 in its high one
    pairs = tl.permute(tl.reshape(levels & 0xF, (SUPERS, 4, 2, 32)), (0, 1, 3, 2))
    low, high = tl.split(pairs)
    qs_offset: tl.constexpr = 16 if NMAX == 15 else 48
    qs_pointers = block[:, None] + qs_offset + tl.arange(0, 128)[None, :]
    tl.store(qs_pointers, tl.reshape(low | (high << 4), (SUPERS, 128)).to(tl.uint8), mask=valid[:, None])
    if NMAX == 31:
        # qh[i]: bit j holds bit 4 of element i of sub-block j
        high_bits = tl.sum(((levels >> 4) & 1) << subs[None, :, None], axis=1)
        qh_pointers = block[:, None] + 16 + tl.arange(0, 32)[None, :]
        tl.store(qh_pointers, high_bits.to(tl.uint8), mask=valid[:, None])


# ---------------------------------------------------------------- launchers

def quantize(rows: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Encode float32 rows (n_rows, n_per_row), contiguous, into qtype (one of TYPES); importance (n_per_row,) float32
    on the rows' device or None (Q8_0 ignores it). Returns uint8 (n_rows, row bytes), or None when the input holds
    values the kernels do not match exactly (see the module's notes): the caller then uses the torch codecs."""
    n_rows, n_per_row = rows.shape
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    n_blocks = rows.numel() // block_values
    out = torch.empty((n_rows, n_per_row // block_values * block_bytes), dtype=torch.uint8, device=rows.device)
    if n_blocks == 0:
        return out
    flag = torch.zeros(1, dtype=torch.int32, device=rows.device)
    if qtype == QType.Q8_0:
        grid = (triton.cdiv(n_blocks, _Q8_0_BLOCKS),)
        _q8_0_kernel[grid](rows, out, flag, n_blocks, BLOCKS=_Q8_0_BLOCKS, **COMPILE_OPTIONS)
    else:
        weighted = importance is not None
        grid = (triton.cdiv(n_blocks, _K_SUPERS),)
        _affine_k_kernel[grid](rows, importance if weighted else rows, out, flag, n_blocks, n_per_row // 256,
                               **k_quant_constants(qtype, weighted), **COMPILE_OPTIONS)
    return None if bool(flag.item()) else out


def k_quant_constants(qtype: QType, weighted: bool) -> dict:
    """The compile-time arguments of _affine_k_kernel for qtype (Q4_K or Q5_K), with or without importance."""
    search = SEARCH_WITH_IMPORTANCE if weighted else _SEARCH[qtype]
    return dict(NMAX=_NMAX[qtype], RMIN=search["rmin"], RDELTA=search["rdelta"], NSTEP=search["nstep"],
                WEIGHTED=weighted, BLOCK_BYTES=GGML_QUANT_SIZES[qtype][1], SUPERS=_K_SUPERS)
