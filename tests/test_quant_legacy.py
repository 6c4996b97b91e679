"""Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1: what test_quant_parity.py does not cover for the 32-value block types."""
from __future__ import annotations

import torch

from ewq_gguf.quant import QType

from quant_inputs import make_importance, make_rows
from quant_reference import torch_bytes


def test_q8_0_ignores_importance():
    rows = make_rows("gaussian", 4, 128)
    with_importance = torch_bytes(rows, QType.Q8_0, make_importance(128))
    assert torch.equal(with_importance, torch_bytes(rows, QType.Q8_0))
