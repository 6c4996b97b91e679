"""Q2_K, Q4_K and Q5_K encoders against ggml_quantize_chunk, byte for byte, and decoders against gguf-py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import quants as gguf_quants

from ewq_gguf.errors import EwqGgufError
from ewq_gguf.quant import kquants_affine, row_nbytes
from ewq_gguf.quant.ggml_reference import library_path, reference_quantize
from tests.quant_inputs import INPUT_CLASSES, make_importance, make_rows

AFFINE_TYPES = (QType.Q2_K, QType.Q4_K, QType.Q5_K)
IMPORTANCE_KINDS = ("none", "dense", "with_zeros")


@pytest.fixture(scope="module")
def ggml():
    try:
        library_path()
    except EwqGgufError as missing:
        pytest.skip(str(missing))
    return reference_quantize


def _importance(kind: str, n_per_row: int, seed: int = 0):
    if kind == "none":
        return None
    return make_importance(n_per_row, seed=seed, with_zeros=kind == "with_zeros")


def _assert_same_bytes(ours: torch.Tensor, reference: np.ndarray):
    ours = ours.numpy()
    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    differing = np.argwhere(ours != reference)
    assert differing.size == 0, f"{len(differing)} bytes differ, first (row, byte): {differing[:5].tolist()}"


def _encode_both(ggml, qtype, rows, importance):
    ours = kquants_affine.CODECS[qtype].quantize(rows, importance)
    reference = ggml(rows.numpy(), qtype, None if importance is None else importance.numpy())
    return ours, reference


@pytest.mark.parametrize("importance_kind", IMPORTANCE_KINDS)
@pytest.mark.parametrize("input_class", INPUT_CLASSES)
@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_bytes_match_ggml(ggml, qtype, input_class, importance_kind):
    rows = make_rows(input_class, 8, 512, seed=3)
    _assert_same_bytes(*_encode_both(ggml, qtype, rows, _importance(importance_kind, 512)))


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_bytes_match_ggml_on_many_heavy_tailed_blocks(ggml, qtype):
    """Enough blocks (1536) that a near-tie in the scale search would show up as a flipped choice."""
    rows = make_rows("student_t3", 48, 2048, seed=11)
    for importance in (None, make_importance(2048, seed=11)):
        _assert_same_bytes(*_encode_both(ggml, qtype, rows, importance))


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_far_outliers_with_zero_importance(ggml, qtype):
    """An ignored (zero-importance) far outlier puts ggml's rounding trick out of its range: its garbage must match."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn((4, 256), generator=generator) * 0.01 - 1.0
    rows[:, 5] = torch.tensor([-1e5, -1e6, -3e7, -1e9])
    rows[:, 40] = torch.tensor([1e5, 1e6, 3e7, 1e9])
    importance = torch.ones(256)
    importance[[5, 40]] = 0.0
    for weights in (None, importance):
        _assert_same_bytes(*_encode_both(ggml, qtype, rows, weights))


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_chunks_that_split_rows(ggml, qtype, monkeypatch):
    """Chunks of 2 super-blocks over rows of 3: each block must still get its own columns' importance."""
    monkeypatch.setitem(kquants_affine._CHUNK_BLOCKS, "cpu", 2)
    rows = make_rows("gaussian", 5, 768, seed=5)
    importance = make_importance(768, seed=5)
    ours, reference = _encode_both(ggml, qtype, rows, importance)
    _assert_same_bytes(ours, reference)
    assert ours.shape == (5, row_nbytes(qtype, 768))


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py_on_encoded_rows(qtype):
    rows = make_rows("student_t3", 6, 512, seed=2)
    codec = kquants_affine.CODECS[qtype]
    data = codec.quantize(rows, None)
    decoded = codec.dequantize(data, 512)
    expected = gguf_quants.dequantize(data.numpy(), qtype)
    assert decoded.dtype == torch.float32 and decoded.shape == rows.shape
    np.testing.assert_array_equal(decoded.numpy(), expected)
    # a sanity bound on the round trip: relative error well below the signal
    assert float(((decoded - rows) ** 2).mean() / (rows**2).mean()) < 0.2


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py_on_arbitrary_bytes(qtype):
    """Every bit pattern of the packed scales and quants decodes as gguf-py decodes it (finite fp16 headers)."""
    block_bytes = row_nbytes(qtype, 256)
    generator = np.random.default_rng(7)
    data = generator.integers(0, 256, size=(64, block_bytes), dtype=np.uint8)
    header = 80 if qtype == QType.Q2_K else 0
    data[:, header:header + 4] = (generator.standard_normal((64, 2)) * 0.01).astype(np.float16).view(np.uint8)
    decoded = kquants_affine.CODECS[qtype].dequantize(torch.from_numpy(data), 256)
    np.testing.assert_array_equal(decoded.numpy(), gguf_quants.dequantize(data, qtype))


def test_codecs_declare_importance_use():
    assert set(kquants_affine.CODECS) == set(AFFINE_TYPES)
    assert all(codec.uses_importance for codec in kquants_affine.CODECS.values())
