"""Q6_K and Q3_K encoders against ggml_quantize_chunk (bytes) and their decoders against gguf-py and ggml."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants

from ewq_gguf.quant import QType, dequantize, quantize
from ewq_gguf.quant import kquants_symmetric
from ewq_gguf.quant.kquants_symmetric import CODECS, make_q3_quants, make_qx_quants

from quant_inputs import INPUT_CLASSES, make_importance, make_rows

reference = pytest.importorskip("ewq_gguf.quant.ggml_reference")

TYPES = (QType.Q6_K, QType.Q3_K)
N_ROWS, N_PER_ROW = 24, 768


def _reference_bytes(rows: torch.Tensor, qtype: QType, importance) -> np.ndarray:
    return reference.reference_quantize(rows.numpy(), qtype, None if importance is None else importance.numpy())


def _assert_same_bytes(ours: torch.Tensor, expected: np.ndarray) -> None:
    ours = ours.numpy()
    assert ours.shape == expected.shape
    differing = np.argwhere(ours != expected)
    assert differing.size == 0, f"{len(differing)} bytes differ, first at (row, byte) {tuple(differing[0])}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", INPUT_CLASSES)
@pytest.mark.parametrize("weighting", ["none", "imatrix", "imatrix_with_zeros"])
def test_bytes_match_ggml(qtype, kind, weighting):
    rows = make_rows(kind, N_ROWS, N_PER_ROW, seed=7)
    importance = None if weighting == "none" else make_importance(N_PER_ROW, seed=3, with_zeros=weighting.endswith("zeros"))
    _assert_same_bytes(quantize(rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bf16_input_is_upcast_like_llama_cpp(qtype):
    rows = make_rows("real_bf16", 4, 512).to(torch.bfloat16)
    _assert_same_bytes(quantize(rows, qtype), _reference_bytes(rows.to(torch.float32), qtype, None))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", range(4))
def test_bytes_match_ggml_across_scales_of_magnitude(qtype, seed):
    # rows whose blocks span 1e-12 .. 1e6, so scales land in fp16's subnormal and overflow ranges too
    generator = torch.Generator().manual_seed(seed)
    magnitudes = 10.0 ** torch.empty(32, 2, 1).uniform_(-12, 6, generator=generator)
    rows = (torch.randn(32, 2, 256, generator=generator) * magnitudes).reshape(32, 512)
    importance = make_importance(512, seed=seed, with_zeros=True)
    _assert_same_bytes(quantize(rows, qtype), _reference_bytes(rows, qtype, None))
    _assert_same_bytes(quantize(rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_chunking_and_batching_do_not_change_bytes(monkeypatch, qtype):
    # many small chunks (one row each) and a group batch that does not divide the number of groups
    monkeypatch.setattr(kquants_symmetric, "CPU_CHUNK_VALUES", 512)
    monkeypatch.setattr(kquants_symmetric, "QX_CPU_GROUPS_PER_BATCH", 7)
    rows = make_rows("student_t3", 5, 768, seed=4)
    importance = make_importance(768, seed=4)
    _assert_same_bytes(quantize(rows, qtype), _reference_bytes(rows, qtype, None))
    _assert_same_bytes(quantize(rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "outlier", "zeros"])
def test_dequantize_matches_gguf_py_and_ggml(qtype, kind):
    rows = make_rows(kind, 6, 512, seed=1)
    data = quantize(rows, qtype)
    ours = dequantize(data, qtype, 512).numpy()
    gguf_py = gguf_quants.dequantize(data.numpy(), qtype).reshape(ours.shape)
    ggml = reference.reference_dequantize(data.numpy(), qtype, 512)
    np.testing.assert_array_equal(ours, gguf_py)
    np.testing.assert_array_equal(ours, ggml)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_decodes_every_code(qtype):
    # random bytes reach every level, scale code and sign of d, not only those our encoder emits
    generator = torch.Generator().manual_seed(5)
    nbytes = CODECS[qtype].quantize(torch.zeros(1, 256), None).shape[1]
    data = torch.randint(0, 256, (16, 2 * nbytes), generator=generator, dtype=torch.uint8)
    data.view(-1, nbytes)[:, -1] &= 0x3B  # keep d finite (exponent below the fp16 inf/nan range)
    ours = dequantize(data, qtype, 512).numpy()
    np.testing.assert_array_equal(ours, reference.reference_dequantize(data.numpy(), qtype, 512))


def test_group_searches_return_ggml_level_ranges():
    x = make_rows("student_t3", 16, 64, seed=2).reshape(16, -1)
    _, q3_levels = make_q3_quants(x)
    _, q6_levels = make_qx_quants(x, 32, x * x)
    assert int(q3_levels.min()) >= 0 and int(q3_levels.max()) == 7
    assert int(q6_levels.min()) >= 0 and int(q6_levels.max()) == 63


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_importance", [False, True])
def test_cuda_bytes_equal_cpu_bytes(qtype, with_importance):
    rows = make_rows("student_t3", 64, 1024, seed=9)
    importance = make_importance(1024, seed=9, with_zeros=True) if with_importance else None
    on_cpu = quantize(rows, qtype, importance)
    on_cuda = quantize(rows.cuda(), qtype, None if importance is None else importance.cuda())
    assert torch.equal(on_cuda.cpu(), on_cpu)
