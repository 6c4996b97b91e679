"""Float32 arithmetic and bit layouts shared by the GGUF encoders, matching ggml's C code bit for bit.

ggml's reference quantizers are scalar C compiled for baseline x86-64 (the libggml-base of llama-cpp-python 0.3.36
holds no FMA or AVX instruction): every float operation is rounded to float32 in program order, sums run left to
right, and no multiply-add is fused. The helpers here reproduce those
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


def sequential_sum(terms: torch.Tensor, dim: int = 0, from_zero: bool = True) -> torch.Tensor:
    """Float32 sum along dim, added one element at a time from the first, as a C loop `s += t[i]`.

    torch.sum reorders the additions (pairwise, vectorised), which changes the last bits; ggml does not.
    from_zero: the C sum starts at +0.0 (`s = 0; s += t[0]; ...`), which turns a first -0.0 into +0.0; False for
    ggml's sums that start at their first term (`s = t[0]; s += t[1]; ...`). Slices along dim are added in place
    as they lie; only where they are strided in their last dimension is the tensor copied first.
    """
    terms = terms.movedim(dim, 0)
    if terms.dim() > 1 and terms.stride(-1) != 1:
        terms = terms.contiguous()
    first, *rest = terms.unbind(0)
    total = first + 0.0 if from_zero else first.clone()
    for term in rest:
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


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite. A finite plain sum proves it in one cheap pass; a sum that overflows only
    sends the caller down its exact (slower) path."""
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def exact_sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C's sqrtf).

    torch.sqrt of float32 on CPU goes through MKL's vector math for large tensors and is off by one ulp on about
    15% of inputs. The float64 root rounded to float32 is correctly rounded: 53 >= 2*24 + 2 bits make the double
    rounding of a square root harmless (Figueroa, "When is double rounding innocuous?", 1995).
    """
    return torch.sqrt(values.to(torch.float64)).to(torch.float32)


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
    first = (candidates == extreme).to(torch.uint8).argmax(dim=0, keepdim=True)
    value = torch.gather(candidates, 0, first)
    # the start value wins unless some element lies strictly beyond it (the comparison is strict)
    beyond = value < start if lowest else value > start
    return torch.where(beyond, value, torch.full_like(value, start)).squeeze(0)


def _first_extreme(x: torch.Tensor, dim: int, start: float, lowest: bool) -> torch.Tensor:
    flat, shape = _as_groups(x, dim)
    extreme = flat.amin(dim=0) if lowest else flat.amax(dim=0)
    extreme = extreme.clamp(max=start) if lowest else extreme.clamp(min=start)
    # NaN reaches amin/amax; a zero extreme may be -0.0 or +0.0, whichever comes first (or the start)
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

ROUND_EVEN_LIMIT = 4194303.0  # within +-this, round-half-even (torch.round) equals ggml's nearest_int bit trick


def round_levels_(scaled: torch.Tensor, low: int, high: int, exact: bool) -> torch.Tensor:
    """In place: MAX(low, MIN(high, nearest_int(scaled))) as float32.

    exact=False: the caller knows every value is finite and within ROUND_EVEN_LIMIT, where torch.round (one cheap
    op) rounds as nearest_int does; beyond that, and for NaN, only nearest_int's bit trick agrees with ggml.
    """
    if exact:
        return scaled.copy_(nearest_int(scaled).clamp_(low, high))
    return scaled.round_().clamp_(low, high)


def pick_trial_scale(sumlx: torch.Tensor, suml2: torch.Tensor, first_if_positive: bool):
    """ggml's choice among the trial scales of weighted least-squares fits (make_qx_quants, IQ4's block scales).

    sumlx, suml2: (trials, groups), the sums of w*x*l and w*l*l of each trial. Trial 0 gives the first scale
    sumlx/suml2 (0 where suml2 fails ggml's test: `suml2 > 0` with first_if_positive, else `suml2 != 0`); then in
    order each later trial replaces it where `suml2 > 0 && sumlx*sumlx > best*suml2`, best = scale*sumlx of the
    last accepted trial. Returns (scale, index of the accepted trial) per group.
    """
    ratios = divide(sumlx, suml2)
    first_valid = suml2[0] > 0 if first_if_positive else suml2[0] != 0
    scale = torch.where(first_valid, ratios[0], torch.zeros_like(ratios[0]))
    best = scale * sumlx[0]
    chosen = torch.zeros(scale.shape, dtype=torch.int64, device=scale.device)
    for trial in range(1, sumlx.shape[0]):
        better = (suml2[trial] > 0) & (sumlx[trial] * sumlx[trial] > best * suml2[trial])
        scale = torch.where(better, ratios[trial], scale)
        best = torch.where(better, ratios[trial] * sumlx[trial], best)
        chosen.masked_fill_(better, trial)
    return scale, chosen


# make_qx_quants on CPU: groups per batch, so that its (2, 19, batch) working tensors stay in cache
QX_CPU_GROUPS_PER_BATCH = 4096


def _qx_numerators(nmax: int, device: torch.device) -> torch.Tensor:
    """make_qx_quants' inverse-scale numerators in its order: -nmax, then -(nmax + 0.1f*is) for is = -9..9, is != 0."""
    steps = torch.tensor([s for s in range(-9, 10) if s != 0], dtype=torch.float32, device=device)
    offsets = torch.cat([torch.zeros(1, device=device), steps * 0.1]) + float(nmax)
    return -offsets


def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, weights) for every group of x at once.

    x: (n, ...) with the n values of each group along dim 0; weights broadcasts against x (pass x*x where ggml
    gets no quant weights). Returns (scale per group, levels (n, ...) uint8 in [0, 2*nmax)) as ggml stores them in
    L, all 0 for a group whose largest magnitude is below GROUP_MAX_EPS. On CPU the groups go through in batches
    small enough for the trials' working tensors to stay in cache.
    """
    x, weights, group_shape = _group_columns(x, weights)
    exact = not all_finite(x)
    batch = QX_CPU_GROUPS_PER_BATCH if x.device.type == "cpu" else x.shape[1]
    scale = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    levels = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for start in range(0, x.shape[1], batch):
        part = slice(start, start + batch)
        scale[part], levels[:, part] = _make_qx_quants(x[:, part], nmax, weights[:, part], exact)
    return scale.reshape(group_shape), levels.reshape(-1, *group_shape)


def _group_columns(x: torch.Tensor, weights: torch.Tensor):
    """x (n, ...) and weights broadcasting against it, as (n, groups) tensors; and the shape of the groups."""
    group_shape = x.shape[1:]
    n = x.shape[0]
    return x.reshape(n, -1), weights.expand(n, *group_shape).reshape(n, -1), group_shape


def _make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor, exact: bool):
    """make_qx_quants for x and weights (n, G).

    All 19 trial scales advance together, one value of the groups at a time, so that ggml's left-to-right sums are
    n additions of whole (2, 19, G) tensors; then pick_trial_scale chooses in ggml's order. For finite x,
    |x| <= |max| bounds every scaled value by nmax + 1, where torch.round is exact (see round_levels_).
    """
    amax, signed_max = first_absmax(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    iscales = divide(_qx_numerators(nmax, x.device).unsqueeze(1), signed_max.unsqueeze(0))  # (19, G)

    x_weighted = weights * x
    trial_levels = torch.empty(iscales.shape, dtype=torch.float32, device=x.device)
    products = torch.empty((2, *iscales.shape), dtype=torch.float32, device=x.device)
    sums = torch.zeros((2, *iscales.shape), dtype=torch.float32, device=x.device)  # C's sums start at +0.0
    for i in range(x.shape[0]):
        round_levels_(torch.mul(iscales, x[i], out=trial_levels), -nmax, nmax - 1, exact)
        torch.mul(trial_levels, x_weighted[i], out=products[0])  # (w*x)*l
        torch.mul(trial_levels, weights[i], out=products[1]).mul_(trial_levels)  # (w*l)*l
        sums += products

    scale, chosen = pick_trial_scale(sums[0], sums[1], first_if_positive=False)
    best_iscale = iscales.gather(0, chosen.unsqueeze(0))
    levels = round_levels_(x * best_iscale, -nmax, nmax - 1, exact).add_(nmax).to(torch.uint8)
    levels.masked_fill_(zero, 0)
    return scale.masked_fill_(zero, 0.0), levels


def make_qkx_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36,
    use_mad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants and make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep,
    use_mad) for every group of x at once (the defaults are make_qkx3's arguments in the imatrix encoders).

    The two C functions are one algorithm: they differ only in the early return for a flat group (`max == min`
    against `max <= min`), and min <= max holds in both unless x[0] is NaN, where neither returns early.
    x and weights: (n, ...) with the n values of each group along dim 0. Returns (scale, the_min, levels): scale
    and the_min (ggml's *the_min, minus the offset) per group, levels (n, ...) uint8 in [0, nmax].

    The search is sequential over its nstep+1 candidates because an accepted candidate moves the offset that later
    candidates start from; every group advances at once. The best levels are not kept but recomputed at the end
    from the (iscale, offset) that produced them.
    """
    x, weights, group_shape = _group_columns(x, weights)
    n = x.shape[0]
    finite = all_finite(x)
    # ggml's scans start from x[0]: a NaN there stays, since no comparison with it is true
    first = x[0]
    x_low = torch.where(torch.isnan(first), first, first_min(x, dim=0, start=float("inf")))
    highest = torch.where(torch.isnan(first), first, first_max(x, dim=0, start=float("-inf")))
    lowest = torch.where(x_low > 0, torch.zeros_like(x_low), x_low)
    flat = highest <= lowest  # ggml returns at once: levels 0, scale 0
    # a harmless range for flat groups, so that no inf/NaN from them forces the exact rounding; masked at the end
    highest = torch.where(flat, lowest.abs() * 2 + 1, highest)
    sum_w = sequential_sum(weights, from_zero=False)
    sum_x = sequential_sum(weights * x, from_zero=False)  # ggml starts it at sum_w * x[0], i.e. w[0]*x[0]
    steps = torch.arange(nstep + 1, dtype=torch.float32, device=x.device)
    rmin_f, rdelta_f = (torch.tensor(value, dtype=torch.float32, device=x.device) for value in (rmin, rdelta))
    numerators = (rmin_f + rdelta_f * steps) + float(nmax)  # C's rmin + rdelta*is + nmax, in float32

    trial = torch.empty_like(x)
    # w*l, w*l*l and w*l*x of every element side by side, so that one run of additions sums all three
    products = torch.empty((n, 3, x.shape[1]), dtype=torch.float32, device=x.device)
    diff = products[:, 0]  # the error terms reuse the first plane once the sums are taken

    def grid_levels(minimum, iscale):
        """MAX(0, MIN(nmax, nearest_int(iscale*(x - minimum)))) into `trial`. iscale*(x - minimum) is monotonic
        along a group and equals the step's numerator at the group's maximum, so its minimum bounds it."""
        torch.mul(torch.sub(x, minimum, out=trial), iscale, out=trial)
        bound = (x_low - minimum).mul_(iscale).abs_().max()
        return round_levels_(trial, 0, nmax, not finite or not bool(bound <= ROUND_EVEN_LIMIT))

    def error(levels, scale, minimum):
        torch.mul(levels, scale, out=diff).add_(minimum).sub_(x)
        (diff.abs_() if use_mad else diff.mul_(diff)).mul_(weights)
        return sequential_sum(diff)

    iscale = divide(float(nmax), highest - lowest)
    scale = divide(1.0, iscale)
    best_error = error(grid_levels(lowest, iscale), scale, lowest)
    # Rows: error, grid iscale, grid minimum, scale, minimum of the best fit so far
    best = torch.stack([best_error, iscale, lowest, scale, lowest])
    candidate = torch.empty_like(best)
    for step in range(nstep + 1):
        minimum = best[4]
        # ggml reuses the best minimum found so far, not the group's own, for the next step's grid
        iscale = torch.div(numerators[step], highest - minimum, out=candidate[1])
        candidate[2].copy_(minimum)
        grid_levels(minimum, iscale)
        weighted = torch.mul(weights, trial, out=products[:, 0])
        torch.mul(weighted, trial, out=products[:, 1])
        torch.mul(weighted, x, out=products[:, 2])
        sum_l, sum_l2, sum_xl = sequential_sum(products)
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
    levels = grid_levels(best_grid_min, best_iscale).masked_fill_(flat, 0.0).to(torch.uint8)
    scale = scale.masked_fill(flat, 0.0)
    minimum = torch.where(flat, lowest, minimum)
    return scale.reshape(group_shape), (-minimum).reshape(group_shape), levels.reshape(n, *group_shape)


# ---------------------------------------------------------------- layout and chunking

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


def encode_in_chunks(rows: torch.Tensor, row_nbytes: int, cpu_chunk_values: int,
                     encode: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """encode(chunk) -> the uint8 bytes of rows[chunk], over chunks of whole rows of about cpu_chunk_values values
    (more on a GPU, see device_chunk_values), into one (n_rows, row_nbytes) tensor on the rows' device."""
    n_rows, n_per_row = rows.shape
    output = torch.empty((n_rows, row_nbytes), dtype=torch.uint8, device=rows.device)
    for chunk in row_chunks(n_rows, n_per_row, device_chunk_values(rows.device, cpu_chunk_values)):
        output[chunk] = encode(chunk).reshape(-1, row_nbytes)
    return output


def to_element_major(rows: torch.Tensor, block: int) -> torch.Tensor:
    """(R, N) -> (block, R*N/block): element i of every block along dim 0, blocks in row order along dim 1."""
    return rows.reshape(-1, block).t().contiguous()


def block_square_sums(rows: torch.Tensor, block: int) -> torch.Tensor:
    """ggml's `sum += x[j]*x[j]` over each block of `block` values of every row, left to right: (R*N/block,)."""
    return sequential_sum(to_element_major(rows * rows, block))


def importance_weights(importance: torch.Tensor, x: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]) for element-major x (block, groups) of whole rows.

    importance: the (n_per_row,) imatrix vector of one row; x's groups run through the rows in order, so the
    vector repeats every n_per_row/block groups. sigma2 broadcasts against x (one value per group).
    """
    block = x.shape[0]
    per_group = importance.reshape(-1, block).t().unsqueeze(1)  # (block, 1, groups per row)
    root = exact_sqrt(sigma2 + x * x)
    return (per_group * root.reshape(block, -1, per_group.shape[2])).reshape(block, -1)
