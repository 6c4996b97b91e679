"""Q6_K and Q3_K: chunking and the group searches' level ranges (bytes and decoders are in test_quant_parity.py)."""
from __future__ import annotations

import pytest

from ewq_gguf.quant import QType, common, kquants_symmetric
from ewq_gguf.quant.common import make_qx_quants
from ewq_gguf.quant.kquants_symmetric import make_q3_quants

from quant_inputs import make_importance, make_rows
from quant_reference import assert_same_bytes, reference_bytes, requires_ggml, torch_bytes

TYPES = (QType.Q6_K, QType.Q3_K)


@requires_ggml
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_chunking_and_batching_do_not_change_bytes(monkeypatch, qtype):
    # many small chunks (one row each) and a group batch that does not divide the number of groups
    monkeypatch.setattr(kquants_symmetric, "CHUNK_VALUES", 512)
    monkeypatch.setattr(common, "QX_CPU_GROUPS_PER_BATCH", 7)
    rows = make_rows("student_t3", 5, 768, seed=4)
    importance = make_importance(768, seed=4)
    assert_same_bytes(torch_bytes(rows, qtype), reference_bytes(rows, qtype, None))
    assert_same_bytes(torch_bytes(rows, qtype, importance), reference_bytes(rows, qtype, importance))


def test_group_searches_return_ggml_level_ranges():
    x = make_rows("student_t3", 16, 64, seed=2).reshape(16, -1)
    _, q3_levels = make_q3_quants(x)
    _, q6_levels = make_qx_quants(x, 32, x * x)
    assert int(q3_levels.min()) >= 0 and int(q3_levels.max()) == 7
    assert int(q6_levels.min()) >= 0 and int(q6_levels.max()) == 63
