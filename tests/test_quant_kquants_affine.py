"""Q2_K, Q4_K and Q5_K: hard cases for the scale searches and chunking (common cases are in test_quant_parity.py)."""
from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as QType

from ewq_gguf.quant import kquants_affine, row_nbytes

from quant_inputs import far_outlier_rows, make_importance, make_rows
from quant_reference import assert_same_bytes, reference_bytes, requires_ggml, torch_bytes

pytestmark = requires_ggml

AFFINE_TYPES = (QType.Q2_K, QType.Q4_K, QType.Q5_K)


def _assert_match(qtype, rows, importance, device="cpu"):
    assert_same_bytes(torch_bytes(rows, qtype, importance, device), reference_bytes(rows, qtype, importance))


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_bytes_match_ggml_on_many_heavy_tailed_blocks(qtype):
    """Enough blocks (1536) that a near-tie in the scale search would show up as a flipped choice."""
    rows = make_rows("student_t3", 48, 2048, seed=11)
    for importance in (None, make_importance(2048, seed=11)):
        _assert_match(qtype, rows, importance)


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_far_outliers_with_zero_importance(qtype):
    rows, importance = far_outlier_rows()
    for weights in (None, importance):
        _assert_match(qtype, rows, weights)


@pytest.mark.parametrize("qtype", AFFINE_TYPES, ids=lambda t: t.name)
def test_chunks_of_several_rows(qtype, monkeypatch):
    """Chunks of 2 rows over 5 rows of 3 super-blocks: every row must get the same columns' importance."""
    monkeypatch.setattr(kquants_affine, "CHUNK_VALUES", 2 * 768)
    rows = make_rows("gaussian", 5, 768, seed=5)
    importance = make_importance(768, seed=5)
    ours = torch_bytes(rows, qtype, importance)
    assert_same_bytes(ours, reference_bytes(rows, qtype, importance))
    assert ours.shape == (5, row_nbytes(qtype, 768))


def test_codecs_declare_importance_use():
    assert set(kquants_affine.CODECS) == set(AFFINE_TYPES)
    assert all(codec.uses_importance for codec in kquants_affine.CODECS.values())
