"""Float32 arithmetic as ggml computes it (ewq_gguf.quant.ggml_arithmetic), against C semantics computed by numpy."""
from __future__ import annotations

import numpy as np
import torch

from ewq_gguf.quant.ggml_arithmetic import exact_sqrt, first_max, first_min, sequential_sum


def test_exact_sqrt_is_correctly_rounded():
    # every binade from subnormals to the largest floats, and the neighbours of exact squares
    rng = np.random.default_rng(0)
    values = (rng.uniform(1, 2, 200_000) * 2.0 ** rng.integers(-149, 127, 200_000)).astype(np.float32)
    squares = np.arange(1, 4097, dtype=np.float32) ** 2
    values = np.concatenate([values, squares, np.nextafter(squares, np.float32(0)),
                             np.nextafter(squares, np.float32(np.inf)), np.float32([0, -0.0, np.inf])])
    expected = np.sqrt(values)  # numpy's float32 sqrt is the hardware's, correctly rounded
    np.testing.assert_array_equal(exact_sqrt(torch.from_numpy(values)).numpy(), expected)


def test_sequential_sum_adds_left_to_right():
    terms = torch.tensor([[1e8, 1.0, -1e8, 1.0], [-0.0, -0.0, -0.0, -0.0]]).t()  # (4 terms, 2 sums)
    total = sequential_sum(terms)
    assert total[0].item() == 1.0  # ((1e8 + 1) - 1e8) + 1 in float32; a pairwise sum gives 2 or 0
    assert not torch.signbit(total[1])  # C's `s = 0; s += -0.0` is +0.0
    assert torch.signbit(sequential_sum(terms, from_zero=False)[1])  # `s = t[0]` keeps -0.0
    # a plane of a larger buffer (strided between rows, contiguous within) and a transposed view agree
    buffer = torch.randn(5, 3, 7)
    assert torch.equal(sequential_sum(buffer[:, 1]), sequential_sum(buffer[:, 1].contiguous()))
    assert torch.equal(sequential_sum(buffer[:, 1].t(), dim=1), sequential_sum(buffer[:, 1]))


def test_scans_keep_the_start_and_the_first_of_equal_values():
    columns = torch.tensor([[-0.0, -1.0], [0.0, float("nan")], [-2.0, -3.0]])  # two groups along dim 0
    above_zero = first_max(columns, dim=0, start=0.0)
    assert above_zero.tolist() == [0.0, 0.0] and not torch.signbit(above_zero).any()  # `v > 0` never holds
    zeros = torch.tensor([[-0.0], [0.0]])
    assert torch.signbit(first_min(zeros, dim=0, start=float("inf")))[0]  # -0.0 came first
    assert not torch.signbit(first_min(zeros.flip(0), dim=0, start=float("inf")))[0]
    assert first_min(columns, dim=0, start=float("inf")).tolist() == [-2.0, -3.0]  # NaN skipped
