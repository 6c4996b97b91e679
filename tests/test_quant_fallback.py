"""llama-quantize's fallback for row lengths a type's block does not divide (src/llama-quant.cpp)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from ewq_gguf.quant import QType, can_hold, effective_type, quantize



@pytest.mark.parametrize("requested, n_per_row, expected", [
    # rows that fit keep their type
    (QType.Q4_K, 1536, QType.Q4_K),
    (QType.IQ4_XS, 2048, QType.IQ4_XS),
    (QType.Q8_0, 576, QType.Q8_0),
    (QType.F16, 577, QType.F16),
    (QType.BF16, 7, QType.BF16),
    # 256-block types fall back to a fixed 32-block type (SmolLM2's hidden size 576 = 18 * 32)
    (QType.Q2_K, 576, QType.Q4_0),
    (QType.Q3_K, 576, QType.Q4_0),
    (QType.Q4_K, 576, QType.Q5_0),
    (QType.Q5_K, 576, QType.Q5_1),
    (QType.Q6_K, 576, QType.Q8_0),
    (QType.IQ4_XS, 576, QType.IQ4_NL),
    (QType.IQ2_XXS, 896, QType.IQ4_NL),
    (QType.IQ3_S, 640, QType.IQ4_NL),
    (QType.TQ1_0, 96, QType.Q4_0),
    # when the substitute does not fit either, F16 is the last resort
    (QType.Q4_K, 100, QType.F16),
    (QType.IQ4_XS, 100, QType.F16),
    # 32-block types have no smaller block: F16 when they do not fit
    (QType.Q8_0, 100, QType.F16),
    (QType.Q4_0, 48, QType.F16),
    (QType.IQ4_NL, 16, QType.F16),
    (QType.MXFP4, 96, QType.MXFP4),
    (QType.MXFP4, 100, QType.F16),
])
def test_effective_type(requested, n_per_row, expected):
    assert effective_type(requested, n_per_row) == expected


# every quantized type the encoders support
REQUESTED = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS, QType.IQ4_NL, QType.Q4_0,
             QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.MXFP4]
# llama-quantize's name for the file type whose --pure run writes a type, where it is not the type's name
FILE_TYPE_NAMES = {QType.MXFP4: "MXFP4_MOE"}


@pytest.mark.parametrize("requested", REQUESTED)
@pytest.mark.parametrize("n_per_row", [32, 96, 576, 640, 896, 1000, 1536, 4096])
def test_result_always_holds_the_row(requested, n_per_row):
    assert can_hold(effective_type(requested, n_per_row), n_per_row)


def test_type_without_fallback_is_refused_like_llama_quantize():
    # NVFP4 has 64-value blocks and no substitute listed: llama-quantize throws
    with pytest.raises(ValueError, match="NVFP4"):
        effective_type(QType.NVFP4, 96)


@pytest.fixture(scope="module")
def odd_width_gguf(tmp_path_factory, llama_quantize):
    """An F32 GGUF of a tiny Llama whose widths are 96 (a multiple of 32, not 256) and 100 (not even of 32)."""
    from ewq_gguf.api import convert
    from testkit.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("odd-width")
    model = make_tiny_model(folder / "model", "LlamaForCausalLM", hidden_size=96, intermediate_size=100,
                            num_attention_heads=2, num_key_value_heads=1)
    convert(model, folder / "f32.gguf", "uniform", type="F32", progress=False)
    return folder / "f32.gguf"


@pytest.mark.parametrize("requested", REQUESTED)
def test_matches_llama_quantize(odd_width_gguf, tmp_path, requested, llama_quantize):
    """llama-quantize --pure writes every matrix in effective_type, with the bytes our encoders produce."""
    out = tmp_path / f"{requested.name}.gguf"
    file_type = FILE_TYPE_NAMES.get(requested, requested.name)
    subprocess.run([str(llama_quantize), "--pure", str(odd_width_gguf), str(out), file_type, "1"],
                   check=True, capture_output=True)
    source = {t.name: t for t in GGUFReader(str(odd_width_gguf)).tensors}
    matrices = [t for t in GGUFReader(str(out)).tensors if len(t.shape) == 2]
    assert {int(t.shape[0]) for t in matrices} == {96, 100}
    for tensor in matrices:
        n_per_row = int(tensor.shape[0])
        expected_type = effective_type(requested, n_per_row)
        assert tensor.tensor_type == expected_type, tensor.name
        rows = torch.from_numpy(np.array(source[tensor.name].data, dtype=np.float32).reshape(-1, n_per_row))
        ours = quantize(rows, expected_type, backend="torch").numpy().reshape(-1)
        assert np.array_equal(ours, np.array(tensor.data).view(np.uint8).reshape(-1)), tensor.name
