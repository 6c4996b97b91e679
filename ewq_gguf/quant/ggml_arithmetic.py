"""Float32 arithmetic as ggml's C code computes it, bit for bit: rounding, fp16, sums, divisions, first-occurrence scans.

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


# ---------------------------------------------------------------- rounding to levels

ROUND_EVEN_LIMIT = 4194303.0  # within +-this, round-half-even (torch.round) equals ggml's nearest_int bit trick


def round_levels_(scaled: torch.Tensor, low: int, high: int, exact: bool) -> torch.Tensor:
    """In place: MAX(low, MIN(high, nearest_int(scaled))) as float32.

    exact=False: the caller knows every value is finite and within ROUND_EVEN_LIMIT, where torch.round (one cheap
    op) rounds as nearest_int does; beyond that, and for NaN, only nearest_int's bit trick agrees with ggml.
    """
    if exact:
        return scaled.copy_(nearest_int(scaled).clamp_(low, high))
    return scaled.round_().clamp_(low, high)
