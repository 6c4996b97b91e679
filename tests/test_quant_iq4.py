"""IQ4_NL and IQ4_XS encoders against ggml_quantize_chunk (bytes), decoders against gguf-py and ggml."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants

from ewq_gguf.quant import QType, dequantize, quantize
from ewq_gguf.quant.iq4 import GRID, best_index, nearest_on_grid

from quant_inputs import INPUT_CLASSES, make_importance, make_rows, make_special_rows

reference = pytest.importorskip("ewq_gguf.quant.ggml_reference")

TYPES = (QType.IQ4_NL, QType.IQ4_XS)
N_ROWS, N_PER_ROW = 8, 512
# the encoders must give the same bytes on every device torch offers here (CUDA where present)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference_bytes(rows: torch.Tensor, qtype: QType, importance) -> np.ndarray:
    return reference.reference_quantize(rows.numpy(), qtype, None if importance is None else importance.numpy())


def _quantize_on(device: str, rows: torch.Tensor, qtype: QType, importance=None) -> torch.Tensor:
    return quantize(rows.to(device), qtype, None if importance is None else importance.to(device))


def _assert_same_bytes(ours: torch.Tensor, expected: np.ndarray) -> None:
    ours = ours.cpu().numpy()
    assert ours.shape == expected.shape
    differing = np.argwhere(ours != expected)
    assert differing.size == 0, f"{len(differing)} bytes differ, first at (row, byte) {tuple(differing[0])}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", INPUT_CLASSES)
@pytest.mark.parametrize("weighting", ["none", "imatrix", "imatrix_with_zeros"])
@pytest.mark.parametrize("device", DEVICES)
def test_bytes_match_ggml(qtype, kind, weighting, device):
    rows = make_rows(kind, N_ROWS, N_PER_ROW, seed=13)
    importance = None
    if weighting != "none":
        importance = make_importance(N_PER_ROW, seed=6, with_zeros=weighting.endswith("zeros"))
    _assert_same_bytes(_quantize_on(device, rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("device, infinities", [("cpu", True)] + [(device, False) for device in DEVICES])
def test_bytes_match_ggml_on_special_values(qtype, seed, device, infinities):
    # ggml generates NaN scales from infinities (inf - inf, 0 * inf); x86 gives such a NaN the sign bit, a GPU does
    # not, so the fp16 header of those blocks differs on CUDA: inputs with infinities are compared on the CPU only
    rows = make_special_rows(seed, infinities=infinities)
    importance = make_importance(rows.shape[1], seed=seed, with_zeros=True)
    _assert_same_bytes(_quantize_on(device, rows, qtype), _reference_bytes(rows, qtype, None))
    _assert_same_bytes(_quantize_on(device, rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("device", DEVICES)
def test_bytes_match_ggml_across_scales_of_magnitude(qtype, seed, device):
    # sub-blocks spanning 1e-12 .. 1e6 within a super-block: IQ4_XS's 6-bit sub-scales clamp, fp16 under/overflows
    generator = torch.Generator().manual_seed(seed)
    magnitudes = 10.0 ** torch.empty(8, 16, 1).uniform_(-12, 6, generator=generator)
    rows = (torch.randn(8, 16, 32, generator=generator) * magnitudes).reshape(8, 512)
    importance = make_importance(512, seed=seed)
    _assert_same_bytes(_quantize_on(device, rows, qtype), _reference_bytes(rows, qtype, None))
    _assert_same_bytes(_quantize_on(device, rows, qtype, importance), _reference_bytes(rows, qtype, importance))


def test_iq4_nl_short_rows():
    rows = make_rows("student_t3", 5, 96, seed=2)
    importance = make_importance(96, seed=2)
    _assert_same_bytes(quantize(rows, QType.IQ4_NL), _reference_bytes(rows, QType.IQ4_NL, None))
    _assert_same_bytes(quantize(rows, QType.IQ4_NL, importance), _reference_bytes(rows, QType.IQ4_NL, importance))


def _ggml_best_index(x: np.float32) -> int:
    """ggml's best_index_int8 over the IQ4 grid, step by step in float32: the binary search and its tie test."""
    grid = [np.float32(v) for v in GRID]
    if x <= grid[0]:
        return 0
    if x >= grid[-1]:
        return len(grid) - 1
    low, high = 0, len(grid) - 1
    while high - low > 1:
        middle = (low + high) // 2
        if x < grid[middle]:
            high = middle
        else:
            low = middle
    return high - 1 if np.float32(x - grid[high - 1]) < np.float32(grid[high] - x) else high


def test_best_index_ties_and_edges_follow_ggml():
    midpoints = [(a + b) / 2 for a, b in zip(GRID, GRID[1:])]
    values = np.concatenate([
        np.arange(-140, 130, 0.25, dtype=np.float32),
        np.random.default_rng(0).uniform(-140, 130, 20000).astype(np.float32),
        np.array(midpoints, dtype=np.float32),
        np.nextafter(np.array(midpoints, dtype=np.float32), np.float32(np.inf)),
        np.nextafter(np.array(midpoints, dtype=np.float32), np.float32(-np.inf)),
        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30], dtype=np.float32),
    ])
    expected = np.array([_ggml_best_index(v) for v in values])
    scaled = torch.from_numpy(values)
    np.testing.assert_array_equal(best_index(scaled, torch.tensor(GRID, dtype=torch.float32)).numpy(), expected)
    # the table path used for finite values: x * 1 must give the same indices and grid values
    finite = torch.isfinite(scaled)
    table_index = nearest_on_grid(scaled[finite], torch.ones(1), finite=True, want_index=True).numpy()
    np.testing.assert_array_equal(table_index, expected[finite.numpy()])
    table_value = nearest_on_grid(scaled[finite], torch.ones(1), finite=True, want_index=False).numpy()
    np.testing.assert_array_equal(table_value, np.array(GRID, dtype=np.float32)[expected[finite.numpy()]])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "outlier", "zeros", "real_bf16"])
def test_dequantize_matches_gguf_py_and_ggml(qtype, kind):
    rows = make_rows(kind, 4, 512, seed=1)
    data = quantize(rows, qtype, make_importance(512))
    ours = dequantize(data, qtype, 512).numpy()
    np.testing.assert_array_equal(ours, gguf_quants.dequantize(data.numpy(), qtype).reshape(4, 512))
    np.testing.assert_array_equal(ours, reference.reference_dequantize(data.numpy(), qtype, 512))
