"""Float32 arithmetic and bit layouts shared by the GGUF encoders, matching ggml's C code bit for bit.

ggml's reference quantizers are scalar C compiled for baseline x86-64: every float operation is rounded to float32
in program order, sums run left to right, and no multiply-add is fused. The helpers here reproduce those semantics
on any torch device, for tensors of blocks laid out with the block's elements along one dimension.
"""
from __future__ import annotations

import torch

FLT_MAX = 3.4028234663852886e38

_ROUNDING_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits
_FP16_NAN_BITS = 0x7E00


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even through the 1.5*2**23 trick, as int32.

    Done with the same float32 addition and bit extraction as ggml, so it also agrees outside the asserted range
    |x| <= 4194303 and for NaN (which gives 0).
    """
    shifted = (values.to(torch.float32) + _ROUNDING_MAGIC).view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


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
    total = torch.zeros_like(terms[0])
    for term in terms:
        total = total + term
    return total


def first_absmax(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) of ggml's scan `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0.

    The first element of largest magnitude wins ties; NaN never wins; a block of zeros gives max = +0.0.
    """
    magnitude = x.abs()
    magnitude = torch.where(torch.isnan(magnitude), torch.zeros_like(magnitude), magnitude)
    amax, index = magnitude.max(dim=dim, keepdim=True)
    signed = torch.gather(x, dim, index)
    signed = torch.where(amax > 0, signed, torch.zeros_like(signed))
    return amax.squeeze(dim), signed.squeeze(dim)


def first_min(x: torch.Tensor, dim: int = -1, start: float = FLT_MAX) -> torch.Tensor:
    """ggml's scan `if (v < m) m = v;` from m = start: NaN skipped, and the first of equal values (-0.0 vs 0.0) kept."""
    candidates = torch.where(torch.isnan(x), torch.full_like(x, start), x)
    lowest = candidates.amin(dim=dim, keepdim=True).clamp(max=start)
    first = (candidates == lowest).to(torch.uint8).argmax(dim=dim, keepdim=True)
    value = torch.gather(candidates, dim, first)
    return torch.where(value == lowest, value, lowest).squeeze(dim)


def first_max(x: torch.Tensor, dim: int = -1, start: float = -FLT_MAX) -> torch.Tensor:
    """ggml's scan `if (v > m) m = v;` from m = start: NaN skipped, and the first of equal values kept."""
    candidates = torch.where(torch.isnan(x), torch.full_like(x, start), x)
    highest = candidates.amax(dim=dim, keepdim=True).clamp(min=start)
    first = (candidates == highest).to(torch.uint8).argmax(dim=dim, keepdim=True)
    value = torch.gather(candidates, dim, first)
    return torch.where(value == highest, value, highest).squeeze(dim)


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


def round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf: to nearest, halves away from zero (torch.round rounds halves to even)."""
    whole = torch.trunc(values)
    fraction = values - whole  # exact: |values| < 2**23 or values is already whole
    step = torch.where(fraction.abs() >= 0.5, torch.sign(values), torch.zeros_like(values))
    return whole + step


def _running_sum_from_first(terms: torch.Tensor) -> torch.Tensor:
    """`s = t[0]; for i >= 1: s += t[i]` along dim 0 (differs from a sum from 0 only in the sign of a zero)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def make_qkx3_quants(
    x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx3_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false).

    x and weights: (n, ...) with the n values of each group along dim 0, every other position an independent
    group. Returns (scale, the_min, levels): scale and the_min (ggml's *the_min, i.e. minus the offset) per group,
    levels (n, ...) int32 in [0, nmax]. The search is sequential over its nstep+1 candidates because an accepted
    candidate moves the offset that later candidates start from; every group advances at once.
    """
    x = x.contiguous()
    weights = weights.expand_as(x).contiguous()
    start = x[0]
    low = torch.where(torch.isnan(start), start, first_min(x, dim=0, start=float("inf")))
    high = torch.where(torch.isnan(start), start, first_max(x, dim=0, start=float("-inf")))
    low = torch.where(low > 0, torch.zeros_like(low), low)
    flat = high <= low

    sum_w = _running_sum_from_first(weights)
    sum_x = _running_sum_from_first(weights * x)
    # ggml: sum_x = sum_w * x[0] before the loop, i.e. w[0]*x[0]; identical to the product's first term

    nmax_f = torch.tensor(float(nmax), dtype=torch.float32, device=x.device)
    iscale = divide(nmax_f, high - low)
    scale = divide(1.0, iscale)
    levels = nearest_int(iscale * (x - low)).clamp_(0, nmax)
    diff = scale * levels.to(torch.float32) + low - x
    best_mad = sequential_sum(weights * (diff * diff))

    rmin_f = torch.tensor(rmin, dtype=torch.float32, device=x.device)
    rdelta_f = torch.tensor(rdelta, dtype=torch.float32, device=x.device)
    for step in range(nstep + 1):
        numerator = rmin_f + rdelta_f * float(step) + nmax_f
        iscale = divide(numerator, high - low)
        candidate = nearest_int(iscale * (x - low)).clamp_(0, nmax)
        candidate_f = candidate.to(torch.float32)
        weighted = weights * candidate_f
        sums = sequential_sum(torch.stack([weighted, weighted * candidate_f, weighted * x], dim=1))
        sum_l, sum_l2, sum_xl = sums[0], sums[1], sums[2]
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = divide(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = divide(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive_min = this_min > 0
        this_scale = torch.where(positive_min, divide(sum_xl, sum_l2), this_scale)
        this_min = torch.where(positive_min, torch.zeros_like(this_min), this_min)
        diff = this_scale * candidate_f + this_min - x
        mad = sequential_sum(weights * (diff * diff))
        better = (det > 0) & (mad < best_mad) & ~flat
        levels = torch.where(better, candidate, levels)
        best_mad = torch.where(better, mad, best_mad)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)

    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -low, levels


def as_int8(values: torch.Tensor) -> torch.Tensor:
    """C's store of an int into int8_t, read back as a signed value: the low byte, sign-extended (int32)."""
    return ((values + 128) & 0xFF) - 128


def row_chunks(n_rows: int, n_per_row: int, chunk_values: int):
    """Slices of rows holding about chunk_values values each (at least one row), to bound working memory."""
    rows_per_chunk = max(1, chunk_values // max(1, n_per_row))
    for start in range(0, n_rows, rows_per_chunk):
        yield slice(start, min(n_rows, start + rows_per_chunk))


def to_element_major(rows: torch.Tensor, block: int) -> torch.Tensor:
    """(R, N) -> (block, R*N/block): element i of every block along dim 0, blocks in row order along dim 1."""
    return rows.reshape(-1, block).t().contiguous()


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


GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest magnitude is below this is stored as zeros


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
    levels = nearest_int(x.unsqueeze(1) * iscales.unsqueeze(0)).clamp_(-nmax, nmax - 1).to(torch.float32)
    weighted = weights.unsqueeze(1) * levels
    sums = sequential_sum(torch.stack([(weights * x).unsqueeze(1) * levels, weighted * levels], dim=1))
    sumlx, suml2 = sums[0], sums[1]  # (19, groups)

    scale = torch.where(suml2[0] != 0, divide(sumlx[0], suml2[0]), torch.zeros_like(sumlx[0]))
    best = scale * sumlx[0]
    best_trial = torch.zeros_like(amax, dtype=torch.int64)
    for trial in range(1, iscales.shape[0]):
        better = (suml2[trial] > 0) & (sumlx[trial] * sumlx[trial] > best * suml2[trial])
        scale = torch.where(better, divide(sumlx[trial], suml2[trial]), scale)
        best = torch.where(better, scale * sumlx[trial], best)
        best_trial = torch.where(better, trial, best_trial)

    chosen = torch.gather(levels, 1, best_trial.view(1, 1, -1).expand(n, 1, -1)).squeeze(1)
    codes = chosen.to(torch.int32) + nmax
    codes = torch.where(zero, torch.zeros_like(codes), codes)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale.reshape(group_shape), codes.reshape(n, *group_shape)
