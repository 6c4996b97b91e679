"""Q6_K and Q3_K: chunking and batching leave the bytes alone (bytes and decoders are in test_quant_parity.py)."""
from __future__ import annotations

import pytest

from ewq_gguf.quant import QType, kquants_symmetric, scale_search

from quant_inputs import make_importance, make_rows
from quant_reference import assert_same_bytes, reference_bytes, requires_ggml, torch_bytes

TYPES = (QType.Q6_K, QType.Q3_K)


@requires_ggml
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_chunking_and_batching_do_not_change_bytes(monkeypatch, qtype):
    # many small chunks (one row each) and a group batch that does not divide the number of groups
    monkeypatch.setattr(kquants_symmetric, "CHUNK_VALUES", 512)
    monkeypatch.setattr(scale_search, "QX_CPU_GROUPS_PER_BATCH", 7)
    rows = make_rows("student_t3", 5, 768, seed=4)
    importance = make_importance(768, seed=4)
    assert_same_bytes(torch_bytes(rows, qtype), reference_bytes(rows, qtype, None))
    assert_same_bytes(torch_bytes(rows, qtype, importance), reference_bytes(rows, qtype, importance))
