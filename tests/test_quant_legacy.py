"""Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 encoders against ggml_quantize_chunk (bytes), decoders against gguf-py and ggml."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants

from ewq_gguf.quant import QType, dequantize, quantize
from ewq_gguf.quant.common import make_qkx3_quants, make_qx_quants

from quant_inputs import INPUT_CLASSES, make_importance, make_rows, make_special_rows

reference = pytest.importorskip("ewq_gguf.quant.ggml_reference")

TYPES = (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1)
N_ROWS, N_PER_ROW = 12, 320
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
    rows = make_rows(kind, N_ROWS, N_PER_ROW, seed=11)
    importance = None
    if weighting != "none":
        importance = make_importance(N_PER_ROW, seed=5, with_zeros=weighting.endswith("zeros"))
    _assert_same_bytes(_quantize_on(device, rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("device, infinities", [("cpu", True)] + [(device, False) for device in DEVICES])
def test_bytes_match_ggml_on_special_values(qtype, seed, device, infinities):
    # ggml generates NaN scales from infinities (inf - inf, 0 * inf); x86 gives such a NaN the sign bit, a GPU does
    # not, so the fp16 header of those blocks differs on CUDA: inputs with infinities are compared on the CPU only
    rows = make_special_rows(seed, n_per_row=256, infinities=infinities)
    importance = make_importance(rows.shape[1], seed=seed, with_zeros=True)
    _assert_same_bytes(_quantize_on(device, rows, qtype), _reference_bytes(rows, qtype, None))
    _assert_same_bytes(_quantize_on(device, rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("device", DEVICES)
def test_bytes_match_ggml_across_scales_of_magnitude(qtype, seed, device):
    # blocks spanning 1e-12 .. 1e6, so scales land in fp16's subnormal and overflow ranges too
    generator = torch.Generator().manual_seed(seed)
    magnitudes = 10.0 ** torch.empty(16, 8, 1).uniform_(-12, 6, generator=generator)
    rows = (torch.randn(16, 8, 32, generator=generator) * magnitudes).reshape(16, 256)
    importance = make_importance(256, seed=seed)
    _assert_same_bytes(_quantize_on(device, rows, qtype), _reference_bytes(rows, qtype, None))
    _assert_same_bytes(_quantize_on(device, rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_per_row", [32, 96])
def test_short_rows(qtype, n_per_row):
    rows = make_rows("student_t3", 5, n_per_row, seed=2)
    importance = make_importance(n_per_row, seed=2)
    _assert_same_bytes(quantize(rows, qtype), _reference_bytes(rows, qtype, None))
    _assert_same_bytes(quantize(rows, qtype, importance), _reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bf16_input_is_upcast_like_llama_cpp(qtype):
    rows = make_rows("real_bf16", 4, 512).to(torch.bfloat16)
    _assert_same_bytes(quantize(rows, qtype), _reference_bytes(rows.to(torch.float32), qtype, None))


def test_q8_0_ignores_importance():
    rows = make_rows("gaussian", 4, 128)
    with_importance = quantize(rows, QType.Q8_0, make_importance(128))
    assert torch.equal(with_importance, quantize(rows, QType.Q8_0))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "outlier", "zeros", "real_bf16"])
def test_dequantize_matches_gguf_py_and_ggml(qtype, kind):
    rows = make_rows(kind, 6, 256, seed=1)
    data = quantize(rows, qtype, make_importance(256))
    ours = dequantize(data, qtype, 256).numpy()
    np.testing.assert_array_equal(ours, gguf_quants.dequantize(data.numpy(), qtype).reshape(6, 256))
    np.testing.assert_array_equal(ours, reference.reference_dequantize(data.numpy(), qtype, 256))


def test_search_helpers_accept_any_group_shape():
    # the k-quants call the shared searches with (n, rows, groups); results must not depend on that grouping
    x = make_rows("student_t3", 4, 32 * 6, seed=4).reshape(4, 6, 32).permute(2, 0, 1)
    weights = make_importance(32, seed=4).view(32, 1, 1) * x * x
    scale, levels = make_qx_quants(x, 8, weights)
    flat_scale, flat_levels = make_qx_quants(x.reshape(32, -1), 8, weights.reshape(32, -1))
    assert torch.equal(scale.reshape(-1), flat_scale) and torch.equal(levels.reshape(32, -1), flat_levels)
    scale, the_min, levels = make_qkx3_quants(x, 15, weights)
    flat = make_qkx3_quants(x.reshape(32, -1), 15, weights.reshape(32, -1))
    assert torch.equal(scale.reshape(-1), flat[0]) and torch.equal(the_min.reshape(-1), flat[1])
    assert torch.equal(levels.reshape(32, -1), flat[2])
