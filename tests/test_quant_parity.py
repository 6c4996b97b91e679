"""Every quantized type against ggml: our encoders' bytes (the torch codecs on every device, the native encoders in
every instruction set this CPU runs: quant_reference.ENCODERS) against ggml_quantize_chunk, and our decoders' values
against ggml's and gguf-py's. Family-specific cases live in test_quant_<family>.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import quants as gguf_quants

from ewq_gguf.quant import CODECS, QType, dequantize, floats, ggml_backend, row_nbytes

from quant_inputs import INPUT_CLASSES, make_importance, make_rows, make_special_rows
from quant_reference import (
    assert_same_bytes, encoder_bytes, encoder_cases, reference_bytes, requires_ggml, torch_bytes,
)

pytestmark = requires_ggml

QUANTIZED = tuple(sorted((t for t in CODECS if t not in floats.CODECS), key=lambda t: t.name))
SMALL_BLOCK = tuple(t for t in QUANTIZED if GGML_QUANT_SIZES[t][0] == 32)
AFFINE_K = (QType.Q2_K, QType.Q4_K, QType.Q5_K)
WEIGHTINGS = ("none", "imatrix", "imatrix_with_zeros")
N_ROWS, N_PER_ROW = 8, 768  # 3 super-blocks, 24 blocks of 32 per row


def _importance(weighting: str, n_per_row: int, seed: int):
    if weighting == "none":
        return None
    return make_importance(n_per_row, seed=seed, with_zeros=weighting.endswith("zeros"))


def _name(value):
    return getattr(value, "name", value)


@pytest.mark.parametrize("qtype, encoder", encoder_cases(QUANTIZED), ids=_name)
@pytest.mark.parametrize("kind", INPUT_CLASSES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_bytes_match_ggml(qtype, encoder, kind, weighting):
    rows = make_rows(kind, N_ROWS, N_PER_ROW, seed=11)
    importance = _importance(weighting, N_PER_ROW, seed=5)
    assert_same_bytes(encoder_bytes(rows, qtype, importance, encoder), reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype, encoder", encoder_cases(QUANTIZED), ids=_name)
@pytest.mark.parametrize("span", [32, 256])
def test_bytes_match_ggml_across_scales_of_magnitude(qtype, encoder, span):
    # every span of values has its own magnitude in 1e-12 .. 1e6, so scales land in fp16's subnormal and overflow
    # ranges, and (span 32) the sub-block scales of one super-block differ by up to 18 decades
    generator = torch.Generator().manual_seed(span)
    magnitudes = 10.0 ** torch.empty(N_ROWS, N_PER_ROW // span, 1).uniform_(-12, 6, generator=generator)
    rows = (torch.randn(N_ROWS, N_PER_ROW // span, span, generator=generator) * magnitudes).reshape(N_ROWS, -1)
    for importance in (None, make_importance(N_PER_ROW, seed=span, with_zeros=True)):
        assert_same_bytes(encoder_bytes(rows, qtype, importance, encoder), reference_bytes(rows, qtype, importance))


# Non-finite input (the writer refuses it) is matched except by the torch codecs with an imatrix in Q2_K/Q4_K/Q5_K,
# whose make_qp_quants pass is not reproduced for NaN scales (the native encoders run it as ggml does).
SPECIAL_CASES = [(qtype, weighting, encoder) for qtype, encoder in encoder_cases(QUANTIZED)
                 for weighting in WEIGHTINGS[:2]
                 if not (encoder.startswith("torch-") and qtype in AFFINE_K and weighting != "none")]


@pytest.mark.parametrize("qtype, weighting, encoder", SPECIAL_CASES, ids=_name)
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("infinities", [True, False])
def test_bytes_match_ggml_on_special_values(qtype, weighting, encoder, seed, infinities):
    # ggml generates NaN scales from infinities (inf - inf, 0 * inf); x86 gives such a NaN the sign bit, a GPU does
    # not, so the fp16 header of those blocks differs on CUDA: inputs with infinities are compared on the CPU only
    if infinities and encoder == "torch-cuda":
        pytest.skip("infinities give NaN scales whose sign differs on a GPU (see ggml_arithmetic)")
    rows = make_special_rows(seed, n_per_row=N_PER_ROW, infinities=infinities)
    importance = _importance(weighting, N_PER_ROW, seed=seed)
    assert_same_bytes(encoder_bytes(rows, qtype, importance, encoder), reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype, encoder", encoder_cases(SMALL_BLOCK), ids=_name)
@pytest.mark.parametrize("n_per_row", [32, 96])
def test_short_rows(qtype, encoder, n_per_row):
    rows = make_rows("student_t3", 5, n_per_row, seed=2)
    for importance in (None, make_importance(n_per_row, seed=2)):
        assert_same_bytes(encoder_bytes(rows, qtype, importance, encoder), reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype, encoder", encoder_cases(QUANTIZED), ids=_name)
def test_bf16_input_is_upcast_like_llama_cpp(qtype, encoder):
    rows = make_rows("real_bf16", 4, 512).to(torch.bfloat16)
    assert_same_bytes(encoder_bytes(rows, qtype, None, encoder), reference_bytes(rows, qtype))


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "outlier", "zeros", "real_bf16"])
def test_dequantize_matches_gguf_py_and_ggml(qtype, kind):
    rows = make_rows(kind, 6, 512, seed=1)
    data = torch_bytes(rows, qtype, make_importance(512))
    ours = dequantize(data, qtype, 512).numpy()
    np.testing.assert_array_equal(ours, gguf_quants.dequantize(data.numpy(), qtype).reshape(ours.shape))
    np.testing.assert_array_equal(ours, ggml_backend.dequantize(data, qtype, 512).numpy())
    # a sanity bound on the round trip: the error well below the signal
    if kind != "zeros":
        assert float(((dequantize(data, qtype, 512) - rows) ** 2).mean() / (rows ** 2).mean()) < 0.2


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # gguf-py's inf * 0, on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf-py's MXFP4 12 * 2^127, likewise
def test_dequantize_decodes_every_code(qtype):
    """Random bytes reach every level, scale code and sign, not only those our encoders emit; fp16 fields that
    come out inf or NaN must do so in the same places as in ggml's decoder."""
    generator = torch.Generator().manual_seed(5)
    data = torch.randint(0, 256, (16, row_nbytes(qtype, 512)), generator=generator, dtype=torch.uint8)
    ours = dequantize(data, qtype, 512).numpy()
    np.testing.assert_array_equal(ours, ggml_backend.dequantize(data, qtype, 512).numpy())
    np.testing.assert_array_equal(ours, gguf_quants.dequantize(data.numpy(), qtype).reshape(ours.shape))
