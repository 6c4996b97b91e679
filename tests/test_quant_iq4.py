"""IQ4_NL and IQ4_XS: the grid lookup against a transcription of ggml's best_index_int8 (bytes and decoders are
in test_quant_parity.py)."""
from __future__ import annotations

import numpy as np
import torch

from ewq_gguf.quant.iq4 import GRID, best_index, nearest_on_grid


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
