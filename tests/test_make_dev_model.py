"""The dithering math of scripts/setup/make_dev_model.py on small synthetic quantized tensors (no network)."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from scripts.setup import make_dev_model

# Per type: byte offsets of its f16 fields, how many consecutive elements share one step, and the number of grid
# levels of one such group (its values span at most levels - 1 steps).
LAYOUT = {
    T.Q8_0: ((0,), 32, 256),
    T.Q4_0: ((0,), 32, 16),
    T.Q5_0: ((0,), 32, 32),
    T.Q4_1: ((0, 2), 32, 16),
    T.Q5_1: ((0, 2), 32, 32),
    T.Q4_K: ((0, 2), 32, 16),
    T.Q6_K: ((208,), 16, 64),
}


def random_blocks(qtype, n_blocks, rng):
    """Random raw blocks of qtype whose f16 fields hold finite values of both signs."""
    f16_offsets, _, _ = LAYOUT[qtype]
    blocks = rng.integers(0, 256, (n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for offset in f16_offsets:
        values = (rng.uniform(1e-3, 1e-2, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", list(LAYOUT), ids=lambda t: t.name)
def test_grid_step_is_the_spacing_of_the_dequantized_values(qtype):
    _, group_size, levels = LAYOUT[qtype]
    blocks = random_blocks(qtype, 64, np.random.default_rng(1))
    values = dequantize(blocks, qtype).reshape(-1, group_size)
    step = make_dev_model.grid_step(blocks, qtype, values.size).reshape(-1, group_size)
    assert np.all(step == step[:, :1]), "one step per group"
    step = step[:, 0]
    nonzero = step > 0
    assert np.all(values[~nonzero] == values[~nonzero][:, :1]), "a zero step means a constant group"
    in_steps = (values[nonzero] - values[nonzero].min(axis=1, keepdims=True)) / step[nonzero, None]
    # A step too large leaves fractions; one too small (say half) lets a group span more than levels - 1 steps.
    assert np.abs(in_steps - np.round(in_steps)).max() < 1e-3
    span = np.round(in_steps.max(axis=1))
    assert span.max() == levels - 1


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_dithered_values_stay_within_half_a_step_of_the_grid_and_leave_it(qtype):
    weights = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    raw = quantize(weights, qtype)
    centre = dequantize(raw, qtype)
    step = make_dev_model.grid_step(raw, qtype, 256)
    dithered = make_dev_model.dither(raw, qtype, 256, np.random.default_rng(0))
    assert dithered.dtype == np.float32 and dithered.shape == weights.shape
    offset_in_steps = (dithered - centre) / step
    assert np.abs(offset_in_steps).max() <= 0.5 + 1e-5
    assert np.abs(offset_in_steps).max() > 0.45, "the noise spans the whole cell"
    assert np.mean(dithered == centre) < 0.01, "values leave the grid"
    assert abs(np.mean(offset_in_steps)) < 0.02, "the noise is centred"


def test_dither_is_reproducible_for_a_seed():
    raw = quantize(np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32), T.Q4_1)
    first = make_dev_model.dither(raw, T.Q4_1, 64, np.random.default_rng(7))
    again = make_dev_model.dither(raw, T.Q4_1, 64, np.random.default_rng(7))
    other = make_dev_model.dither(raw, T.Q4_1, 64, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_write_dithered_f32_gguf_keeps_metadata_and_float_tensors(tmp_path):
    rng = np.random.default_rng(4)
    norm = rng.standard_normal(64).astype(np.float32)
    weight = rng.standard_normal((4, 64)).astype(np.float32)
    src, dst = tmp_path / "q.gguf", tmp_path / "f32.gguf"
    writer = GGUFWriter(src, "llama")
    writer.add_uint32("general.file_type", 3)
    writer.add_uint32("llama.block_count", 1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.add_tensor("norm.weight", norm)
    writer.add_tensor("blk.0.weight", quantize(weight, T.Q4_1), raw_dtype=T.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    make_dev_model.write_dithered_f32_gguf(src, dst, seed=0)

    reader = GGUFReader(dst)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == 0
    assert reader.fields["llama.block_count"].contents() == 1
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b"]
    tensors = {t.name: t for t in reader.tensors}
    assert all(t.tensor_type == T.F32 for t in tensors.values())
    assert np.array_equal(np.asarray(tensors["norm.weight"].data), norm)
    raw = quantize(weight, T.Q4_1)
    expected = make_dev_model.dither(raw, T.Q4_1, 64, np.random.default_rng(0))
    assert np.array_equal(np.asarray(tensors["blk.0.weight"].data).reshape(4, 64), expected)
