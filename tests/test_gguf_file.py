"""GGUF FILES: the header reader agrees with gguf-py's GGUFReader on the tensor table, every metadata value and the
F32 tensors' values."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from ewq_gguf.errors import InputError
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


def test_every_metadata_value_and_f32_tensor_reads_as_gguf_py_reads_it(tiny_gguf):
    path = tiny_gguf("F32")
    ours, reference = read_gguf(path), GGUFReader(path)
    expected = {key: field.contents() for key, field in reference.fields.items() if not key.startswith("GGUF.")}
    assert list(ours.metadata) == list(expected), "every key, in file order"
    for key, value in expected.items():
        assert ours.value(key) == value, key
    by_name = {tensor.name: tensor for tensor in reference.tensors}
    for tensor in ours.tensors:
        assert np.array_equal(ours.f32_values(tensor), by_name[tensor.name].data), tensor.name


def test_f32_values_refuses_other_types(tiny_gguf):
    ours = read_gguf(tiny_gguf("Q8_0"))
    quantized = next(tensor for tensor in ours.tensors if tensor.type_name == "Q8_0")
    with pytest.raises(InputError, match="not F32"):
        ours.f32_values(quantized)
