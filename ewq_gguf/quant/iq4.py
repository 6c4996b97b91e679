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

from .codec import Codec
from .common import (
    divide, exact_sqrt, first_absmax, fp16_bytes, int_bytes, nearest_int, pack_nibbles, row_chunks, sequential_sum,
    to_element_major,
)

BLOCK = 32
SUPER_BLOCK = 256
SUB_BLOCKS = SUPER_BLOCK // BLOCK
NTRY = 7
GROUP_MAX_EPS = 1e-15  # ggml: a block whose largest magnitude is below this gets scale 0
# The non-linear 4-bit grid, ggml's kvalues_iq4nl.
GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
CHUNK_VALUES = 1 << 16
NL_BLOCK_BYTES = 18
XS_BLOCK_BYTES = 136


def _grid(device: torch.device) -> torch.Tensor:
    return torch.tensor(GRID, dtype=torch.float32, device=device)


def best_index(scaled: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8(16, grid, x): nearest grid index, ties to the upper one, NaN to 15 (int64).

    Below grid[0] and above grid[15] the tie test itself picks the end, as ggml's early returns do.
    """
    upper = torch.bucketize(scaled, grid, right=True).clamp_(1, len(GRID) - 1)
    below, above = grid[upper - 1], grid[upper]
    index = torch.where((scaled - below) < (above - scaled), upper - 1, upper)
    return torch.where(torch.isnan(scaled), torch.full_like(index, len(GRID) - 1), index)


def _block_scales(x: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
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
    codes = grid[best_index(x.unsqueeze(1) * ids.unsqueeze(0), grid)]  # (32, 16, blocks)
    weighted = weights.unsqueeze(1) * codes
    sums = sequential_sum(torch.stack([weighted * x.unsqueeze(1), weighted * codes], dim=1))
    sumqx, sumq2 = sums[0], sums[1]  # (16, blocks)

    d = torch.where(sumq2[0] > 0, divide(sumqx[0], sumq2[0]), torch.zeros_like(sumqx[0]))
    best = d * sumqx[0]
    for trial in range(1, ids.shape[0]):
        better = (sumq2[trial] > 0) & (sumqx[trial] * sumqx[trial] > best * sumq2[trial])
        d = torch.where(better, divide(sumqx[trial], sumq2[trial]), d)
        best = torch.where(better, d * sumqx[trial], best)
    return torch.where(zero, torch.zeros_like(d), d)


def _weights(x: torch.Tensor, super_sums: torch.Tensor, importance: Optional[torch.Tensor], n_rows: int,
             super_block: int) -> torch.Tensor:
    """x^2 without importance; else qw * sqrt(sigma2 + x^2), sigma2 = 2/super_block * sum of x^2 over it."""
    if importance is None:
        return x * x
    sigma2 = super_sums * (2.0 / super_block)
    per_block_importance = to_element_major(importance.reshape(1, -1), BLOCK).repeat(1, n_rows)
    return per_block_importance * exact_sqrt(sigma2 + x * x)


def _encode_nl(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    grid = _grid(rows.device)
    x = to_element_major(rows, BLOCK)
    weights = _weights(x, sequential_sum(x * x), importance, rows.shape[0], BLOCK)
    scale = _block_scales(x, weights, grid)
    inverse = torch.where(scale != 0, divide(1.0, scale), torch.zeros_like(scale))
    codes = best_index(x * inverse, grid)
    return torch.cat([fp16_bytes(scale), pack_nibbles(codes[:16], codes[16:]).t()], dim=1)


def _encode_xs(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    grid = _grid(rows.device)
    x = to_element_major(rows, BLOCK)  # (32, super_blocks*8)
    n_super = x.shape[1] // SUB_BLOCKS
    # ggml sums x^2 over the super-block in memory order: block 0's 32 values, then block 1's, ...
    squares = (x * x).reshape(BLOCK, n_super, SUB_BLOCKS).permute(2, 0, 1).reshape(SUPER_BLOCK, n_super)
    super_sums = sequential_sum(squares).repeat_interleave(SUB_BLOCKS)
    weights = _weights(x, super_sums, importance, rows.shape[0], SUPER_BLOCK)
    scales = _block_scales(x, weights, grid).reshape(n_super, SUB_BLOCKS)

    _, max_scale = first_absmax(scales, dim=1)
    d = divide(-max_scale, 32.0)
    inverse = torch.where(d != 0, divide(1.0, d), torch.zeros_like(d))
    levels = nearest_int(inverse.unsqueeze(1) * scales).clamp_(-32, 31)  # (n_super, 8)
    block_d = d.unsqueeze(1) * levels.to(torch.float32)
    block_inverse = torch.where(block_d != 0, divide(1.0, block_d), torch.zeros_like(block_d)).reshape(-1)
    codes = best_index(x * block_inverse, grid)

    stored = levels + 32
    scales_low = pack_nibbles(stored[:, 0::2], stored[:, 1::2])  # (n_super, 4)
    shifts = torch.arange(0, 2 * SUB_BLOCKS, 2, dtype=torch.int32, device=x.device)
    scales_high = ((stored >> 4) << shifts).sum(dim=1, dtype=torch.int32)
    qs = pack_nibbles(codes[:16], codes[16:]).t().reshape(n_super, SUB_BLOCKS * 16)
    return torch.cat([fp16_bytes(d), int_bytes(scales_high, 2), scales_low, qs], dim=1)


def _in_chunks(encode, rows: torch.Tensor, importance: Optional[torch.Tensor], row_nbytes: int) -> torch.Tensor:
    n_rows, n_per_row = rows.shape
    output = torch.empty((n_rows, row_nbytes), dtype=torch.uint8, device=rows.device)
    for chunk in row_chunks(n_rows, n_per_row, CHUNK_VALUES):
        output[chunk] = encode(rows[chunk], importance).reshape(-1, row_nbytes)
    return output


def quantize_iq4_nl(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return _in_chunks(_encode_nl, rows, importance, rows.shape[1] // BLOCK * NL_BLOCK_BYTES)


def quantize_iq4_xs(rows: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    return _in_chunks(_encode_xs, rows, importance, rows.shape[1] // SUPER_BLOCK * XS_BLOCK_BYTES)


def _grid_values(qs: torch.Tensor) -> torch.Tensor:
    """(…, 16) bytes -> (…, 32) grid values: low nibbles are elements 0..15, high nibbles 16..31."""
    codes = qs.to(torch.int64)
    return _grid(qs.device)[torch.cat([codes & 0x0F, codes >> 4], dim=-1)]


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
