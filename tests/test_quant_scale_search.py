"""ggml's scale searches (ewq_gguf.quant.scale_search): independent of how groups are shaped, ggml's level ranges.

Their bytes against ggml are checked through the encoders in test_quant_parity.py."""
from __future__ import annotations

import torch

from ewq_gguf.quant.scale_search import make_q3_quants, make_qkx_quants, make_qx_quants

from quant_inputs import make_importance, make_rows


def test_search_helpers_accept_any_group_shape():
    # the encoders call the shared searches with (n, rows, groups); results must not depend on that grouping
    x = make_rows("student_t3", 4, 32 * 6, seed=4).reshape(4, 6, 32).permute(2, 0, 1)
    weights = make_importance(32, seed=4).view(32, 1, 1) * x * x
    scale, levels = make_qx_quants(x, 8, weights)
    flat_scale, flat_levels = make_qx_quants(x.reshape(32, -1), 8, weights.reshape(32, -1))
    assert torch.equal(scale.reshape(-1), flat_scale) and torch.equal(levels.reshape(32, -1), flat_levels)
    scale, the_min, levels = make_qkx_quants(x, 15, weights)
    flat = make_qkx_quants(x.reshape(32, -1), 15, weights.reshape(32, -1))
    assert torch.equal(scale.reshape(-1), flat[0]) and torch.equal(the_min.reshape(-1), flat[1])
    assert torch.equal(levels.reshape(32, -1), flat[2])


def test_group_searches_return_ggml_level_ranges():
    x = make_rows("student_t3", 16, 64, seed=2).reshape(16, -1)
    _, q3_levels = make_q3_quants(x)
    _, q6_levels = make_qx_quants(x, 32, x * x)
    assert int(q3_levels.min()) >= 0 and int(q3_levels.max()) == 7
    assert int(q6_levels.min()) >= 0 and int(q6_levels.max()) == 63
