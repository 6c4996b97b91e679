"""GPTQ rounding inside the GGUF formats (quant/gptq.py): valid ggml bytes, lower output error, known optima."""
from __future__ import annotations

import pytest
import torch

from ewq_gguf.quant import dequantize, ggml_backend, quantize
from ewq_gguf.quant.gptq import GPTQ_TYPES, code_layout, gptq_quantize, gptq_rows, output_error, pack_codes

TYPES = sorted(GPTQ_TYPES, key=lambda qtype: qtype.name)
# the k-quants pick their codes as nearest_int((x + dmin*m) / (d*sc)) against the stored scales, so with a diagonal
# H (no error to compensate) GPTQ must give their very bytes
NEAREST_ON_STORED_SCALES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _problem(rows: int = 16, columns: int = 512, samples: int = 1024, seed: int = 0):
    """Random W and inputs X with correlated, unevenly scaled columns; returns W, H = X^T X."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(columns) + torch.randn(columns, columns, generator=generator) / columns ** 0.5
    x = torch.randn(samples, columns, generator=generator) @ mixing * (0.2 + 2 * torch.rand(columns, generator=generator))
    return torch.randn(rows, columns, generator=generator), x.t() @ x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_codes_pack_back_into_the_same_bytes(qtype):
    layout = code_layout(qtype)
    rows = torch.randn(8, layout.elements * 2, generator=torch.Generator().manual_seed(3))
    blocks = quantize(rows, qtype, None, backend="torch").reshape(-1, layout.nbytes)
    low, high = layout.code_range
    codes = torch.randint(low, high + 1, (blocks.shape[0], layout.elements), generator=torch.Generator().manual_seed(4))
    repacked = pack_codes(pack_codes(blocks, codes, layout), torch.zeros_like(codes), layout)
    # replacing codes touches nothing else: zero codes over the original bytes equal zero codes over the new ones
    assert torch.equal(repacked, pack_codes(blocks, torch.zeros_like(codes), layout))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_ggml_decodes_gptq_bytes_as_we_do_and_the_output_error_drops(qtype):
    weight, hessian = _problem()
    result = gptq_quantize(weight, hessian, qtype)
    ours = dequantize(result.data, qtype, weight.shape[1])
    if ggml_backend.available():
        assert torch.equal(ggml_backend.dequantize(result.data, qtype, weight.shape[1]), ours)
    assert result.rounding == "gptq"
    assert result.objective_gptq < 0.9 * result.objective_nearest
    assert result.objective_gptq == pytest.approx(output_error(weight, ours, hessian))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_diagonal_inputs_give_nearest_rounding_on_the_searched_scales(qtype):
    weight, hessian = _problem(seed=1)
    diagonal = torch.diag(hessian.diagonal())
    rounded = gptq_rows(weight, diagonal, qtype)
    nearest = quantize(weight, qtype, hessian.diagonal())
    if qtype.name in NEAREST_ON_STORED_SCALES:
        assert torch.equal(rounded, nearest)
    else:  # codes picked on other scales (trial or unrounded ones): the stored grid's nearest codes are no worse
        error = output_error(weight, dequantize(rounded, qtype, weight.shape[1]), diagonal)
        assert error <= output_error(weight, dequantize(nearest, qtype, weight.shape[1]), diagonal) * (1 + 1e-6)


@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_identical_inputs_leave_only_the_last_columns_rounding_error(qtype_name):
    """All inputs equal (H = n * ones): the output is x * sum(w), so the optimum makes sum(q) as close to sum(w) as
    the grid allows; GPTQ carries every column's error into the next and ends within half a step of it."""
    from gguf import GGMLQuantizationType as QType

    qtype = QType[qtype_name]
    columns = code_layout(qtype).elements
    weight = torch.randn(4, columns, generator=torch.Generator().manual_seed(5))
    hessian = torch.full((columns, columns), 100.0)
    result = gptq_rows(weight, hessian, qtype, damp=1e-6)
    q = dequantize(result, qtype, columns)
    nearest = dequantize(quantize(weight, qtype, hessian.diagonal()), qtype, columns)
    residual = (weight.sum(1) - q.sum(1)).abs()
    # the largest grid step of the last column bounds what is left
    step = (q - weight).abs().amax(dim=1) * 2 + 1e-6
    assert bool((residual <= step).all())
    assert float(residual.pow(2).sum()) < float((weight.sum(1) - nearest.sum(1)).pow(2).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine: scripts/gpu/triton.sh)")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda qtype: qtype.name)
def test_cuda_rounds_to_the_cpu_bytes(qtype):
    weight, hessian = _problem(rows=64, columns=1024, seed=5)
    importance = torch.rand(weight.shape[1], generator=torch.Generator().manual_seed(6)) + 0.5
    cpu = gptq_rows(weight, hessian.double(), qtype, importance)
    cuda = gptq_rows(weight.cuda(), hessian.double().cuda(), qtype, importance.cuda())
    assert torch.equal(cuda.cpu(), cpu)
