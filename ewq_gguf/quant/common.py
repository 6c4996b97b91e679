"""Float32 arithmetic and bit layouts shared by the GGUF encoders, matching ggml's C code bit for bit.

ggml's reference quantizers are scalar C compiled for baseline x86-64 (no FMA): every float operation is rounded
to float32 in program order, sums run left to right, and no multiply-add is fused. The helpers here reproduce those
semantics on any torch device, for tensors of groups laid out with the group's elements along one dimension.

Speed notes (CPU): torch.where, masked_fill and max-with-indices cost 30-60 times a plain elementwise op on large
tensors, so the scans below decide most groups with plain reductions and send only ambiguous groups (ties of +m and
-m, signed zeros, NaN) through the exact first-occurrence scan.

Devices: results are the same bytes on CPU and CUDA, with one exception ggml's arithmetic itself creates. Where an
input holds infinities, ggml computes some scales as inf - inf or 0 * inf; x86 gives such a NaN the sign bit
(fp16 0xFE00) and a GPU does not (0x7E00), so those blocks' fp16 scale differs in that one bit on CUDA.
"""
from __future__ import annotations

from typing import Callable

import torch

FLT_MAX = 3.4028234663852886e38
GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest magnitude is below this is stored as zeros

_ROUNDING_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits
_FP16_NAN_BITS = 0x7E00
_BELOW_HALF = 0.49999997  # the float32 just below 0.5: x + copysign(it, x) truncates to C's roundf(x)


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the 1.5*2**23 trick, as int32.

    Done with the same float32 addition and bit extraction as ggml, so it also agrees outside the asserted range
    |x| <= 4194303 and for NaN (0 for the payload-free NaNs that torch and x86 produce).
    """
    values = values.to(torch.float32)
    shifted = (values + _ROUNDING_MAGIC).view(torch.int32)
    rounded = (shifted & 0x007FFFFF) - 0x00400000
    if values.device.type != "cpu":
        # a GPU returns its one canonical NaN (0x7FFFFFFF, read as 4194303) where x86 keeps the operand's quiet
        # NaN, whose empty payload reads as 0
        rounded = torch.where(torch.isnan(values), torch.zeros_like(rounded), rounded)
    return rounded


def truncate_to_int(values: torch.Tensor) -> torch.Tensor:
    """C's float-to-int conversion as x86-64 executes it (cvttss2si): toward zero, NaN and overflow give INT_MIN.

    The result is int32; C code that stores it in an int8_t or uint8_t keeps the low byte, see low_byte.
    """
    invalid = torch.isnan(values) | (values.abs() >= 2147483648.0)
    truncated = torch.where(invalid, torch.zeros_like(values), values).to(torch.int32)
    return torch.where(invalid, torch.full_like(truncated, -2147483648), truncated)


def low_byte(values: torch.Tensor) -> torch.Tensor:
    """The low 8 bits of an integer tensor as uint8 (C's conversion of an int to uint8_t or int8_t)."""
    return (values & 0xFF).to(torch.uint8)


def as_int8(values: torch.Tensor) -> torch.Tensor:
    """C's store of an int into int8_t, read back as a signed value: the low byte, sign-extended (int32)."""
    return ((values + 128) & 0xFF) - 128


def round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf (to nearest, halves away from zero) of finite values, as int32.

    Adding the float just below 0.5 with x's sign and truncating is exact for every float: it never rounds a value
    below a half up, unlike adding 0.5 (0.49999997 + 0.5 rounds to 1.0).
    """
    return (values + torch.copysign(torch.full_like(values, _BELOW_HALF), values)).to(torch.int32)


def to_fp16(values: torch.Tensor) -> torch.Tensor:
    """ggml's GGML_FP32_TO_FP16: round to nearest even, overflow to infinity, every NaN to 0x7E00 with its sign."""
    half = values.to(torch.float16)
    nan = torch.isnan(values)
    if not bool(nan.any()):
        return half
    sign = torch.signbit(values).to(torch.int16) * -32768
    canonical_nan = (sign | _FP16_NAN_BITS).to(torch.int16).view(torch.float16)
    return torch.where(nan, canonical_nan, half)


def fp16_round(values: torch.Tensor) -> torch.Tensor:
    """The float32 value a scale takes after the fp16 round trip of ggml's block headers."""
    return to_fp16(values).to(torch.float32)


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


def sequential_sum(terms: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Float32 sum along dim, added one element at a time from the first, as a C loop `s += t[i]` starting at 0.

    torch.sum reorders the additions (pairwise, vectorised), which changes the last bits; ggml does not.
    """
    terms = terms.movedim(dim, 0).contiguous()
    total = terms[0] + 0.0  # C's sum starts at +0.0, which turns a first -0.0 into +0.0
    for term in terms[1:]:
        total.add_(term)
    return total


def running_sum_from_first(terms: torch.Tensor) -> torch.Tensor:
    """`s = t[0]; for i >= 1: s += t[i]` along dim 0 (differs from sequential_sum only in the sign of a zero)."""
    total = terms[0].clone()
    for term in terms[1:]:
        total.add_(term)
    return total


def divide(numerator, denominator) -> torch.Tensor:
    """numerator / denominator with one float32 rounding on every device.

    torch turns `number / tensor` into reciprocal-then-multiply and, on CUDA, `tensor / cpu_scalar` too; both round
    twice. Here both sides become tensors on the same device first, so the division is a true IEEE division.
    """
    reference = denominator if isinstance(denominator, torch.Tensor) else numerator
    if not isinstance(numerator, torch.Tensor):
        numerator = torch.tensor(numerator, dtype=torch.float32, device=reference.device)
    if not isinstance(denominator, torch.Tensor):
        denominator = torch.tensor(denominator, dtype=torch.float32, device=reference.device)
    return torch.div(numerator, denominator)


def nonzero_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """ggml's `d ? 1.0f/d : 0.0f` (NaN counts as true)."""
    return torch.where(d != 0, divide(1.0, d), torch.zeros_like(d))


def exact_sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C's sqrtf).

    torch.sqrt on CPU goes through MKL's vector math for large tensors and is off by one ulp on about 15% of
    inputs. Here the float64 root, rounded to float32, is corrected against the exact squares of the two
    neighbouring float32 midpoints (25-bit numbers, so their squares are exact in float64).
    """
    wide = values.to(torch.float64)
    root = torch.sqrt(wide).to(torch.float32)
    finite = torch.isfinite(root) & (root > 0)
    above = torch.nextafter(root, torch.full_like(root, float("inf")))
    below = torch.nextafter(root, torch.zeros_like(root))
    root_wide = root.to(torch.float64)
    upper_mid = (root_wide + above.to(torch.float64)) * 0.5
    lower_mid = (root_wide + below.to(torch.float64)) * 0.5
    root = torch.where(finite & (wide > upper_mid * upper_mid), above, root)
    return torch.where(finite & (wide < lower_mid * lower_mid), below, root)


# ---------------------------------------------------------------- ggml's first-occurrence scans

def _as_groups(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Size]:
    """x with dim moved first and the rest flattened: (n, groups), and the shape of one result per group."""
    moved = x.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1), moved.shape[1:]


def _redo_groups(flat: torch.Tensor, unsure: torch.Tensor, scan: Callable, results: tuple[torch.Tensor, ...]):
    """Replace the results of the unsure groups (columns of flat) by the exact scan over those groups alone."""
    if not bool(unsure.any()):
        return results
    columns = unsure.nonzero().squeeze(1)
    exact = scan(flat.index_select(1, columns))
    return tuple(result.index_copy(0, columns, value) for result, value in zip(results, exact))


def _absmax_scan(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    magnitude = flat.abs()
    magnitude = torch.where(torch.isnan(magnitude), torch.zeros_like(magnitude), magnitude)
    amax, index = magnitude.max(dim=0, keepdim=True)
    signed = torch.gather(flat, 0, index)
    return amax.squeeze(0), signed.squeeze(0)


def first_absmax(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) of ggml's scan `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0.

    The first element of largest magnitude wins ties; NaN never wins; a group of zeros gives max = +0.0.
    """
    flat, shape = _as_groups(x, dim)
    highest, lowest = flat.amax(dim=0), flat.amin(dim=0)
    amax = torch.maximum(highest, -lowest)
    signed = torch.where(highest >= -lowest, highest, lowest)
    # NaN reaches amax/amin; +m and -m both present need the first-occurrence rule
    unsure = torch.isnan(amax) | ((highest == -lowest) & (highest != 0))
    amax, signed = _redo_groups(flat, unsure, _absmax_scan, (amax, signed))
    signed = torch.where(amax > 0, signed, torch.zeros_like(signed))
    return amax.abs().reshape(shape), signed.reshape(shape)


def _extreme_scan(flat: torch.Tensor, start: float, lowest: bool) -> torch.Tensor:
    candidates = torch.where(torch.isnan(flat), torch.full_like(flat, start), flat)
    extreme = candidates.amin(dim=0, keepdim=True) if lowest else candidates.amax(dim=0, keepdim=True)
    extreme = extreme.clamp(max=start) if lowest else extreme.clamp(min=start)
    first = (candidates == extreme).to(torch.uint8).argmax(dim=0, keepdim=True)
    value = torch.gather(candidates, 0, first)
    return torch.where(value == extreme, value, extreme).squeeze(0)


def _first_extreme(x: torch.Tensor, dim: int, start: float, lowest: bool) -> torch.Tensor:
    flat, shape = _as_groups(x, dim)
    extreme = flat.amin(dim=0) if lowest else flat.amax(dim=0)
    extreme = extreme.clamp(max=start) if lowest else extreme.clamp(min=start)
    # NaN reaches amin/amax; a zero extreme may be -0.0 or +0.0, whichever comes first
    unsure = torch.isnan(extreme) | (extreme == 0)
    (extreme,) = _redo_groups(flat, unsure, lambda sub: (_extreme_scan(sub, start, lowest),), (extreme,))
    return extreme.reshape(shape)


def first_min(x: torch.Tensor, dim: int = -1, start: float = FLT_MAX) -> torch.Tensor:
    """ggml's scan `if (v < m) m = v;` from m = start: NaN skipped, and the first of equal values (-0.0 vs 0.0) kept."""
    return _first_extreme(x, dim, start, lowest=True)


def first_max(x: torch.Tensor, dim: int = -1, start: float = -FLT_MAX) -> torch.Tensor:
    """ggml's scan `if (v > m) m = v;` from m = start: NaN skipped, and the first of equal values kept."""
    return _first_extreme(x, dim, start, lowest=False)


# ---------------------------------------------------------------- ggml's scale searches

def _levels(scaled: torch.Tensor, low: int, high: int, bounded: bool = False) -> torch.Tensor:
    """clamp(nearest_int(scaled), low, high) as float32.

    bounded: the caller knows every value is finite and below 2**22 in magnitude, where torch.round (one cheap op)
    rounds exactly as nearest_int; past that, and for NaN, only nearest_int's bit trick agrees with ggml.
    """
    if bounded:
        return torch.round(scaled).clamp_(low, high)
    return nearest_int(scaled).clamp_(low, high).to(torch.float32)


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, weights) for every group of x at once.

    x: (n, ...) with the n values of each group along dim 0; weights broadcasts against x (pass x*x where ggml
    gets no quant weights). Returns (scale, levels): scale per group and levels (n, ...) int32 in [0, 2*nmax) as
    ggml stores them in L, all 0 for a group whose largest magnitude is below GROUP_MAX_EPS. The 18 trial scales
    -(nmax + 0.1*is)/max are evaluated together; only the acceptance test runs in ggml's order.
    """
    group_shape = x.shape[1:]
    n = x.shape[0]
    x = x.reshape(n, -1)
    weights = weights.expand(n, *group_shape).reshape(n, -1)
    amax, signed_max = first_absmax(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)

    steps = torch.tensor([s for s in range(-9, 10) if s != 0], dtype=torch.float32, device=x.device)
    offsets = torch.cat([torch.zeros(1, device=x.device), steps * 0.1]) + float(nmax)  # nmax + 0.1f*is
    iscales = divide(-offsets.unsqueeze(1), signed_max.unsqueeze(0))  # (19, groups); row 0 is -nmax/max
    # |x| <= |max| bounds every scaled value by nmax + 1, where torch.round equals nearest_int; NaN/inf need the latter
    finite = bool(torch.isfinite(x).all())
    levels = _levels(x.unsqueeze(1) * iscales.unsqueeze(0), -nmax, nmax - 1, finite)  # (n, 19, groups)
    products = torch.empty((n, 2, *levels.shape[1:]), dtype=torch.float32, device=x.device)
    torch.mul((weights * x).unsqueeze(1), levels, out=products[:, 0])
    torch.mul(weights.unsqueeze(1), levels, out=products[:, 1]).mul_(levels)
    sums = sequential_sum(products)
    sumlx, suml2 = sums[0], sums[1]  # (19, groups)

    scale = torch.where(suml2[0] != 0, divide(sumlx[0], suml2[0]), torch.zeros_like(sumlx[0]))
    best = scale * sumlx[0]
    best_iscale = iscales[0]
    for trial in range(1, iscales.shape[0]):
        better = (suml2[trial] > 0) & (sumlx[trial] * sumlx[trial] > best * suml2[trial])
        scale = torch.where(better, divide(sumlx[trial], suml2[trial]), scale)
        best = torch.where(better, scale * sumlx[trial], best)
        best_iscale = torch.where(better, iscales[trial], best_iscale)

    codes = _levels(x * best_iscale, -nmax, nmax - 1, finite).to(torch.int32) + nmax
    codes = torch.where(zero, torch.zeros_like(codes), codes)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale.reshape(group_shape), codes.reshape(n, *group_shape)


def make_qkx3_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false).

    x and weights: (n, ...) with the n values of each group along dim 0, every other position an independent
    group. Returns (scale, the_min, levels): scale and the_min (ggml's *the_min, i.e. minus the offset) per group,
    levels (n, ...) int32 in [0, nmax]. The search is sequential over its nstep+1 candidates because an accepted
    candidate moves the offset that later candidates start from; every group advances at once. Levels are
    recomputed at the end from the (iscale, offset) pair that produced the accepted candidate.
    """
    group_shape = x.shape[1:]
    n = x.shape[0]
    x = x.reshape(n, -1)
    weights = weights.expand(n, *group_shape).reshape(n, -1)
    start = x[0]
    data_low = torch.where(torch.isnan(start), start, first_min(x, dim=0, start=float("inf")))
    high = torch.where(torch.isnan(start), start, first_max(x, dim=0, start=float("-inf")))
    low = torch.where(data_low > 0, torch.zeros_like(data_low), data_low)
    flat = high <= low
    finite = bool(torch.isfinite(x.sum()))

    def levels_for(iscale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # fl(iscale*fl(x - offset)) is monotone in x, so the group's extremes bound every scaled value
        extremes = torch.stack([iscale * (data_low - offset), iscale * (high - offset)])
        extremes = torch.where(flat, torch.zeros_like(extremes), extremes)
        bounded = finite and bool((extremes.abs() < 4194303).all())
        return _levels(iscale * (x - offset), 0, nmax, bounded)

    sum_w = running_sum_from_first(weights)
    sum_x = running_sum_from_first(weights * x)  # ggml starts it at sum_w * x[0], i.e. w[0]*x[0]

    nmax_f = torch.tensor(float(nmax), dtype=torch.float32, device=x.device)
    iscale = divide(nmax_f, high - low)
    scale = divide(1.0, iscale)
    levels = levels_for(iscale, low)
    diff = scale * levels + low - x
    best_mad = sequential_sum(weights * (diff * diff))
    levels_iscale, levels_low = iscale, low

    rmin_f = torch.tensor(rmin, dtype=torch.float32, device=x.device)
    rdelta_f = torch.tensor(rdelta, dtype=torch.float32, device=x.device)
    products = torch.empty((n, 3, x.shape[1]), dtype=torch.float32, device=x.device)
    for step in range(nstep + 1):
        iscale = divide(rmin_f + rdelta_f * float(step) + nmax_f, high - low)
        candidate = levels_for(iscale, low)
        weighted = torch.mul(weights, candidate, out=products[:, 0])
        torch.mul(weighted, candidate, out=products[:, 1])
        torch.mul(weighted, x, out=products[:, 2])
        sum_l, sum_l2, sum_xl = sequential_sum(products)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = divide(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = divide(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive_min = this_min > 0
        this_scale = torch.where(positive_min, divide(sum_xl, sum_l2), this_scale)
        this_min = torch.where(positive_min, torch.zeros_like(this_min), this_min)
        diff = (this_scale * candidate).add_(this_min).sub_(x)
        mad = sequential_sum(diff.mul_(diff).mul_(weights))
        better = (det > 0) & (mad < best_mad) & ~flat
        levels_iscale = torch.where(better, iscale, levels_iscale)
        levels_low = torch.where(better, low, levels_low)
        best_mad = torch.where(better, mad, best_mad)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)

    levels = levels_for(levels_iscale, levels_low).to(torch.int32)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.reshape(group_shape), (-low).reshape(group_shape), levels.reshape(n, *group_shape)


# ---------------------------------------------------------------- layout

GPU_CHUNK_FACTOR = 64


def device_chunk_values(device: torch.device, cpu_chunk_values: int) -> int:
    """Values per chunk on device: a GPU takes chunks GPU_CHUNK_FACTOR times larger than the CPU's cache-sized
    ones, since there every torch call costs a kernel launch and memory is plentiful."""
    return cpu_chunk_values * (GPU_CHUNK_FACTOR if device.type == "cuda" else 1)


def row_chunks(n_rows: int, n_per_row: int, chunk_values: int):
    """Slices of rows holding about chunk_values values each (at least one row), to bound working memory."""
    rows_per_chunk = max(1, chunk_values // max(1, n_per_row))
    for start in range(0, n_rows, rows_per_chunk):
        yield slice(start, min(n_rows, start + rows_per_chunk))


def to_element_major(rows: torch.Tensor, block: int) -> torch.Tensor:
    """(R, N) -> (block, R*N/block): element i of every block along dim 0, blocks in row order along dim 1."""
    return rows.reshape(-1, block).t().contiguous()
