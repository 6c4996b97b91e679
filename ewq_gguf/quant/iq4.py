"""IQ4_NL (32-value blocks) and IQ4_XS (256-value super-blocks): 4-bit codes on ggml's non-linear grid.

Byte-identical to ggml_quantize_chunk (quantize_iq4_nl / quantize_iq4_xs, both through quantize_row_iq4_nl_impl
with ntry = 7). Per 32 values: weights are x^2, or imatrix * sqrt(sigma2 + x^2) with sigma2 twice the super-block's
mean square; a first scale from the largest magnitude, then 15 trial scales (itry - 127)/max, keeping a trial when
its weighted fit sumqx^2/sumq2 beats the best so far. IQ4_NL stores that scale as fp16; IQ4_XS stores 6-bit
sub-scales on an fp16 super-scale and re-picks the codes against the stored sub-scale.

Layout: element-major (32, sub-blocks) within a chunk of rows, so per-block scans and sums run along dim 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from gguf import GGMLQuantizationType as QType

from .chunking import encode_in_chunks, to_element_major
from .codec import Codec
from .ggml_arithmetic import all_finite, divide, first_absmax, nearest_int, nonzero_reciprocal, sequential_sum
from .packing import fp16_bytes, int_bytes, pack_nibbles, unpack_nibbles
from .scale_search import GROUP_MAX_EPS, block_square_sums, importance_weights, pick_trial_scale

BLOCK = 32
SUPER_BLOCK = 256
SUB_BLOCKS = SUPER_BLOCK // BLOCK
NTRY = 7
# The non-linear 4-bit grid, ggml's kvalues_iq4nl.
GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
CHUNK_VALUES = 1 << 16
NL_BLOCK_BYTES = 18
XS_BLOCK_BYTES = 136


def _grid(device: torch.device) -> torch.Tensor:
    return torch.tensor(GRID, dtype=torch.float32, device=device)


# ggml's tie test `x - grid[k] < grid[k+1] - x` flips exactly at the midpoint of each pair of neighbours (no
# rounding in those subtractions reaches the comparison; tests/test_quant_iq4.py checks the midpoints and their
# float neighbours against a transcription of best_index_int8). The midpoints are multiples of 1/2, so
# floor(2x) alone decides the index: a 483-entry table over floor(2x) in [-255, 227].
_TWICE_LOW, _TWICE_HIGH = 2 * GRID[0] - 1, 2 * GRID[-1] + 1
_INDEX_BY_TWICE = [
    sum(1 for a, b in zip(GRID, GRID[1:]) if twice >= a + b) for twice in range(_TWICE_LOW, _TWICE_HIGH + 1)
]


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, grid value) for every floor(2x) + 255."""
    index = torch.tensor(_INDEX_BY_TWICE, dtype=torch.int64, device=device)
    return index, _grid(device)[index]


def best_index(scaled: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8(16, grid, x) for any float: nearest grid index, ties to the upper one, NaN to 15 (int64).

    Below grid[0] and above grid[15] the tie test itself picks the end, as ggml's early returns do.
    """
    upper = torch.bucketize(scaled, grid, right=True).clamp_(1, len(GRID) - 1)
    below, above = grid[upper - 1], grid[upper]
    index = torch.where((scaled - below) < (above - scaled), upper - 1, upper)
    return torch.where(torch.isnan(scaled), torch.full_like(index, len(GRID) - 1), index)


def _table_slots(twice_scaled: torch.Tensor) -> torch.Tensor:
    """Row of the tables for finite 2x: floor(2x) clamped to the tables' span, as int64."""
    return twice_scaled.floor_().clamp_(_TWICE_LOW, _TWICE_HIGH).sub_(_TWICE_LOW).to(torch.int64)


def nearest_on_grid(x: torch.Tensor, scale_inverse: torch.Tensor, finite: bool, want_index: bool) -> torch.Tensor:
    """best_index (want_index) or the grid value it picks, for x * scale_inverse (broadcast).

    finite: the caller checked x and 2*scale_inverse are finite, so the product has no NaN and the table applies.
    """
    if not finite:
        index = best_index(x * scale_inverse, _grid(x.device))
        return index if want_index else _grid(x.device)[index]
    index_table, value_table = _tables(x.device)
    slots = _table_slots(x * (scale_inverse * 2.0)).reshape(-1)  # 2*(a*b) == (2*a)*b: doubling is exact
    shape = torch.broadcast_shapes(x.shape, scale_inverse.shape)
    return torch.index_select(index_table if want_index else value_table, 0, slots).reshape(shape)


def _block_scales(x: torch.Tensor, weights: torch.Tensor, finite_x: bool) -> torch.Tensor:
    """The scale quantize_row_iq4_nl_impl picks for each 32-value block of element-major x (32, blocks)."""
    amax, signed_max = first_absmax(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)

    # the first guess d = -max/grid[0], then the trials id = (itry + grid[0])/max, all evaluated together
    trial_ids = divide(
        torch.arange(-NTRY, NTRY + 1, dtype=torch.float32, device=x.device).add_(GRID[0]).unsqueeze(1),
        signed_max.unsqueeze(0),
    )
    first_id = divide(1.0, divide(-signed_max, float(GRID[0])))
    ids = torch.cat([first_id.unsqueeze(0), trial_ids], dim=0)  # (16, blocks)
    finite = finite_x and bool(torch.isfinite(ids * 2.0).all())
    codes = nearest_on_grid(x.unsqueeze(1), ids.unsqueeze(0), finite, want_index=False)  # (32, 16, blocks)
    weighted = weights.unsqueeze(1) * codes
    products = torch.empty((x.shape[0], 2, *codes.shape[1:]), dtype=torch.float32, device=x.device)
    torch.mul(weighted, x.unsqueeze(1), out=products[:, 0])
    torch.mul(weighted, codes, out=products[:, 1])
    sums = sequential_sum(products)
    d, _ = pick_trial_scale(sums[0], sums[1], first_if_positive=True)
    return torch.where(zero, torch.zeros_like(d), d)


def _weights(x: torch.Tensor, super_sums: torch.Tensor, importance: Optional[torch.Tensor],
             super_block: int) -> torch.Tensor:
    """x^2 without importance; else qw * sqrt(sigma2 + x^2), sigma2 = 2/super_block * sum of x^2 over it."""
    if importance is None:
        return x * x
    return importance_weights(importance, x, super_sums * (2.0 / super_block))


def _encode_nl(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    x = to_element_major(rows, BLOCK)
    finite = all_finite(x)
    weights = _weights(x, sequential_sum(x * x), importance, BLOCK)
    scale = _block_scales(x, weights, finite)
    inverse = nonzero_reciprocal(scale)
    codes = nearest_on_grid(x, inverse, finite and bool(torch.isfinite(inverse * 2.0).all()), want_index=True)
    return torch.cat([fp16_bytes(scale), pack_nibbles(codes[:16], codes[16:]).t()], dim=1)


def _encode_xs(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    x = to_element_major(rows, BLOCK)  # (32, super_blocks*8)
    finite = all_finite(x)
    n_super = x.shape[1] // SUB_BLOCKS
    super_sums = block_square_sums(rows, SUPER_BLOCK).repeat_interleave(SUB_BLOCKS)
    weights = _weights(x, super_sums, importance, SUPER_BLOCK)
    scales = _block_scales(x, weights, finite).reshape(n_super, SUB_BLOCKS)

    _, max_scale = first_absmax(scales, dim=1)
    d = divide(-max_scale, 32.0)
    inverse = nonzero_reciprocal(d)
    levels = nearest_int(inverse.unsqueeze(1) * scales).clamp_(-32, 31)  # (n_super, 8)
    block_d = d.unsqueeze(1) * levels.to(torch.float32)
    block_inverse = nonzero_reciprocal(block_d).reshape(-1)
    finite = finite and bool(torch.isfinite(block_inverse * 2.0).all())
    codes = nearest_on_grid(x, block_inverse, finite, want_index=True)

    stored = levels + 32
    scales_low = pack_nibbles(stored[:, 0::2], stored[:, 1::2])  # (n_super, 4)
    shifts = torch.arange(0, 2 * SUB_BLOCKS, 2, dtype=torch.int32, device=x.device)
    scales_high = ((stored >> 4) << shifts).sum(dim=1, dtype=torch.int32)
    qs = pack_nibbles(codes[:16], codes[16:]).t().reshape(n_super, SUB_BLOCKS * 16)
    return torch.cat([fp16_bytes(d), int_bytes(scales_high, 2), scales_low, qs], dim=1)


def quantize_iq4_nl(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return encode_in_chunks(rows, rows.shape[1] // BLOCK * NL_BLOCK_BYTES, CHUNK_VALUES,
                            lambda chunk: _encode_nl(rows[chunk], importance))


def quantize_iq4_xs(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return encode_in_chunks(rows, rows.shape[1] // SUPER_BLOCK * XS_BLOCK_BYTES, CHUNK_VALUES,
                            lambda chunk: _encode_xs(rows[chunk], importance))


def _grid_values(qs: torch.Tensor) -> torch.Tensor:
    """(…, 16) bytes -> (…, 32) grid values: low nibbles are elements 0..15, high nibbles 16..31."""
    return _grid(qs.device)[unpack_nibbles(qs).to(torch.int64)]


def dequantize_iq4_nl(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = data.reshape(data.shape[0], n_per_row // BLOCK, NL_BLOCK_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).to(torch.float32)
    return (d * _grid_values(blocks[..., 2:])).reshape(data.shape[0], n_per_row)


def dequantize_iq4_xs(data: torch.Tensor, n_per_row: int) -> torch.Tensor:
    blocks = data.reshape(data.shape[0], n_per_row // SUPER_BLOCK, XS_BLOCK_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).to(torch.float32)
    scales_high = blocks[..., 2].to(torch.int32) | (blocks[..., 3].to(torch.int32) << 8)
    scales_low = blocks[..., 4:8].to(torch.int32)
    low = torch.stack([scales_low & 0x0F, scales_low >> 4], dim=-1).reshape(*blocks.shape[:2], SUB_BLOCKS)
    shifts = torch.arange(0, 2 * SUB_BLOCKS, 2, dtype=torch.int32, device=data.device)
    high = (scales_high.unsqueeze(-1) >> shifts) & 3
    block_d = d * ((low | (high << 4)) - 32).to(torch.float32)  # ggml: dl = d * (ls - 32)
    values = _grid_values(blocks[..., 8:].reshape(*blocks.shape[:2], SUB_BLOCKS, 16))
    return (block_d.unsqueeze(-1) * values).reshape(data.shape[0], n_per_row)


CODECS: dict[QType, Codec] = {
    QType.IQ4_NL: Codec(quantize=quantize_iq4_nl, dequantize=dequantize_iq4_nl, uses_importance=True),
    QType.IQ4_XS: Codec(quantize=quantize_iq4_xs, dequantize=dequantize_iq4_xs, uses_importance=True),
}
