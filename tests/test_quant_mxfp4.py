"""MXFP4: the cases of its arithmetic that the input classes of test_quant_parity.py reach only by chance.

The E8M0 exponent floorf(log2f(amax)) - 2 + 127 where log2f rounds up to the next integer, where the cast wraps
(amax below 2^-125) and at the top of the float range; values exactly half-way between two E2M1 levels and their
float neighbours, at scales from subnormal to huge; zero and negative-zero blocks. Bytes against ggml_quantize_chunk
on every device torch offers here.

The encoder has two paths for the codes: the midpoint table for finite input and ggml's step-by-step scan, taken
where a chunk's plain sum is not finite (common.all_finite), which blocks near FLT_MAX make happen. Rows are
therefore compared with ggml in two groups, lone huge values are compared on their own, and the table is compared
with the scan on the huge blocks too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ewq_gguf.quant import QType
from ewq_gguf.quant.mxfp4 import MAGNITUDES, block_exponents, e8m0_half, nearest_codes, scanned_codes

from quant_inputs import make_importance, make_rows
from quant_reference import DEVICES, assert_same_bytes, reference_bytes, requires_ggml, torch_bytes

pytestmark = requires_ggml

MXFP4 = QType.MXFP4
BLOCK = 32
# rows of blocks below this magnitude keep the sum of a chunk finite: the midpoint table encodes them
TABLE_PATH_BOUND = 2.0 ** 100


def _around_powers_of_two(ulps: int) -> torch.Tensor:
    """Blocks (one per row) whose amax is each positive float within `ulps` steps of a power of two, 2^-149 up to
    FLT_MAX, so that log2f's rounding up to the integer (just below 2^n), subnormal amax (the exponent byte wraps to
    232..255) and FLT_MAX all occur; the other 31 values are amax times fractions, some negative."""
    powers = np.arange(-149, 129)
    power_bits = np.where(powers < 128, np.ldexp(np.float32(1), np.minimum(powers, 127)).astype(np.float32)
                          .view(np.int32), 0x7F800000)
    bits = (power_bits[:, None] + np.arange(-ulps, ulps + 1)[None, :]).reshape(-1)
    bits = np.unique(bits[(bits >= 1) & (bits <= 0x7F7FFFFF)]).astype(np.int32)
    amax = torch.from_numpy(bits.view(np.float32).copy()).unsqueeze(1)
    return torch.cat([amax, amax * torch.linspace(-1, 1, BLOCK - 1)], dim=1)


def _half_way_blocks() -> torch.Tensor:
    """Values half-way between two E2M1 magnitudes, the next float either side, and values above the top level, of
    both signs, under every scale from subnormal (amax 1.5 * 2^-125, e = 0) to 2^124 (amax 1.5 * 2^127); each
    block's first value sets its scale and the last of each pair of blocks is a negative zero."""
    exponents = torch.arange(-125, 128, dtype=torch.int32)
    amax = torch.ldexp(torch.full((len(exponents), 1), 1.5), exponents.unsqueeze(1))
    d = torch.ldexp(torch.ones(len(exponents), 1), exponents.unsqueeze(1) - 3)     # 2^(floor(log2 amax) - 3)
    midpoints = torch.tensor([(low + high) / 2 for low, high in zip(MAGNITUDES, MAGNITUDES[1:])] + [14.0, 15.5])
    levels = midpoints * d
    up, down = (torch.nextafter(levels, torch.full_like(levels, bound)) for bound in (float("inf"), 0.0))
    values = torch.cat([levels, up, down, -levels, -up, -down], dim=1)                  # 54 per scale
    padded = torch.cat([values, torch.zeros(len(exponents), 61 - values.shape[1])], dim=1)
    return torch.cat([amax, padded[:, :31], amax, padded[:, 31:], torch.full_like(amax, -0.0)], dim=1)


def _assert_same_as_ggml(rows: torch.Tensor, device: str) -> None:
    on_table_path = rows.abs().amax(dim=1) < TABLE_PATH_BOUND
    for part in (rows[on_table_path], rows[~on_table_path]):
        assert_same_bytes(torch_bytes(part, MXFP4, device=device), reference_bytes(part, MXFP4))


@pytest.mark.parametrize("device", DEVICES)
def test_exponent_where_log2f_rounds_and_the_cast_wraps(device):
    _assert_same_as_ggml(_around_powers_of_two(256), device)


@pytest.mark.parametrize("device", DEVICES)
def test_values_half_way_between_levels_and_their_neighbours(device):
    """Ties go to the smaller magnitude (the first kvalue ggml meets); the next float either side by distance."""
    _assert_same_as_ggml(_half_way_blocks().reshape(-1, 2 * BLOCK), device)


@pytest.mark.parametrize("device", DEVICES)
def test_lone_values_at_the_top_of_the_float_range(device):
    """The 64 floats below FLT_MAX of both signs, each alone in a call (beside zeros, so that the sum stays finite
    and the table encodes it). Where log2f rounds amax up to 2^128, d = 2^125 and 8*d, 12*d overflow: ggml never
    picks them (their error is inf), so these values take 6, not 8."""
    top = torch.arange(0x7F7FFFFF - 63, 0x7F7FFFFF + 1, dtype=torch.int32).view(torch.float32)
    for value in torch.cat([top, -top]).tolist():
        block = torch.zeros(1, BLOCK)
        block[0, 0] = value
        assert_same_bytes(torch_bytes(block, MXFP4, device=device), reference_bytes(block, MXFP4))


@pytest.mark.parametrize("device", DEVICES)
def test_table_equals_the_scan_at_every_scale(device):
    for rows in (_around_powers_of_two(16), _half_way_blocks()):
        x = rows.reshape(-1, BLOCK).to(device)
        d = e8m0_half(block_exponents(x.abs().amax(dim=1))).unsqueeze(1)
        assert torch.equal(nearest_codes(x, d), scanned_codes(x, d))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_blocks(device):
    """All +0.0, all -0.0 and a mix: e = 0 and code 0 (not 8, the other zero), as ggml writes them."""
    rows = torch.zeros(3, 4 * BLOCK)
    rows[1] = -0.0
    rows[2, ::2] = -0.0
    expected = reference_bytes(rows, MXFP4)
    assert not bool(expected.any())
    assert_same_bytes(torch_bytes(rows, MXFP4, device=device), expected)


def test_importance_is_ignored():
    rows = make_rows("student_t3", 4, 256)
    assert torch.equal(torch_bytes(rows, MXFP4, make_importance(256)), torch_bytes(rows, MXFP4))
