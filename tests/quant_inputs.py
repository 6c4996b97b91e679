"""Deterministic input rows for byte-identity tests of the GGUF encoders against ggml_quantize_chunk.

Each class stresses a different part of an encoder: typical scales (gaussian), heavy tails (student_t3), one huge
value per row (outlier), exact zeros and equal values (zeros, constant), underflow of scales (tiny), exact ties of
magnitude and half-way rounding (grid), and real bf16 weights of the development model (found through
testkit/resources.py).
"""
from __future__ import annotations

import torch

from testkit import resources

REAL_TENSOR = "model.layers.0.mlp.down_proj.weight"

INPUT_CLASSES = ("gaussian", "student_t3", "outlier", "zeros", "constant", "tiny", "grid", "real_bf16")


def make_rows(kind: str, n_rows: int, n_per_row: int, seed: int = 0) -> torch.Tensor:
    """float32 (n_rows, n_per_row) rows of one input class; the same arguments always give the same values."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n_rows, n_per_row)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator) * 0.02
    if kind == "student_t3":
        normal = torch.randn(shape, generator=generator)
        chi2 = torch.randn((3, *shape), generator=generator).pow(2).sum(dim=0)
        return normal / torch.sqrt(chi2 / 3) * 0.02
    if kind == "outlier":
        rows = torch.randn(shape, generator=generator) * 0.02
        columns = torch.randint(0, n_per_row, (n_rows,), generator=generator)
        signs = torch.where(torch.rand(n_rows, generator=generator) < 0.5, -1.0, 1.0)
        rows[torch.arange(n_rows), columns] = signs * 40.0
        return rows
    if kind == "zeros":
        rows = torch.zeros(shape)
        rows[::2, ::3] = -0.0  # signed zeros: ggml's first-wins scans must not pick up the sign
        return rows
    if kind == "constant":
        values = torch.randn((n_rows, 1), generator=generator) * 0.05
        return values.expand(shape).contiguous()
    if kind == "tiny":
        return torch.randn(shape, generator=generator) * 1e-30
    if kind == "grid":
        # small integers times a power of two: many equal magnitudes of both signs and exact half-way products
        return torch.randint(-8, 9, shape, generator=generator).to(torch.float32) * 0.0078125
    if kind == "real_bf16":
        return _real_rows(n_rows, n_per_row)
    raise ValueError(f"unknown input class {kind!r}")


def _real_rows(n_rows: int, n_per_row: int) -> torch.Tensor:
    checkpoint_file = resources.dev_model("smollm2") / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(checkpoint_file), framework="pt") as checkpoint:
        weights = checkpoint.get_tensor(REAL_TENSOR).to(torch.float32).reshape(-1)
    needed = n_rows * n_per_row
    repeats = -(-needed // weights.numel())
    return weights.repeat(repeats)[:needed].reshape(n_rows, n_per_row).contiguous()


def make_special_rows(seed: int, n_rows: int = 8, n_per_row: int = 512, infinities: bool = True) -> torch.Tensor:
    """Rows of mixed magnitudes sprinkled with NaN, signed zeros, subnormals and, with infinities, +-inf and 1e38
    (whose squares overflow): the inputs from which ggml's arithmetic itself generates NaN."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn((n_rows, 1), generator=generator) * 3)
    rows = torch.randn((n_rows, n_per_row), generator=generator) * scales
    draw = torch.rand((n_rows, n_per_row), generator=generator)
    specials = [(0.0, 0.01, float("nan")), (0.02, 0.05, 0.0), (0.05, 0.07, -0.0), (0.08, 0.09, 1e-40)]
    if infinities:
        specials += [(0.01, 0.015, float("inf")), (0.015, 0.02, -float("inf")), (0.07, 0.08, 1e38)]
    for low, high, value in specials:
        rows[(draw >= low) & (draw < high)] = value
    return rows


def make_importance(n_per_row: int, seed: int = 0, with_zeros: bool = False) -> torch.Tensor:
    """A positive imatrix-like vector (mean squared activations span decades); with_zeros adds dead columns."""
    generator = torch.Generator().manual_seed(seed + 1000)
    importance = torch.exp(torch.randn(n_per_row, generator=generator) * 1.5)
    if with_zeros:
        importance[torch.rand(n_per_row, generator=generator) < 0.1] = 0.0
    return importance


def far_outlier_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows near -1 with far outliers (up to 1e9) that an importance vector ignores (weight 0): the outliers put
    ggml's float rounding trick out of its range, so encoders must reproduce the garbage it makes."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn((4, 256), generator=generator) * 0.01 - 1.0
    rows[:, 5] = torch.tensor([-1e5, -1e6, -3e7, -1e9])
    rows[:, 40] = torch.tensor([1e5, 1e6, 3e7, 1e9])
    importance = torch.ones(256)
    importance[[5, 40]] = 0.0
    return rows, importance
