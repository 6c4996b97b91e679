"""GGUF FILES: the header reader agrees with gguf-py's GGUFReader."""
from __future__ import annotations

import pytest
from gguf import GGUFReader

from ewq_gguf.gguf_file import read_gguf


@pytest.mark.parametrize("type_name", ["F32", "Q8_0"])
def test_header_reader_agrees_with_gguf_py(tiny_gguf, type_name):
    path = tiny_gguf(type_name)
    ours, reference = read_gguf(path), GGUFReader(path)
    assert [(t.name, t.type_name, t.n_bytes, t.offset) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, int(t.n_bytes), int(t.data_offset) - reference.data_offset)
        for t in reference.tensors]
    assert ours.data_offset == reference.data_offset
    assert ours.tokens == list(reference.fields["tokenizer.ggml.tokens"].contents())
    assert ours.chat_template == reference.fields["tokenizer.chat_template"].contents()
    n_weights = sum(int(t.n_elements) for t in reference.tensors)
    assert ours.bits_per_weight == pytest.approx(8 * sum(int(t.n_bytes) for t in reference.tensors) / n_weights)
