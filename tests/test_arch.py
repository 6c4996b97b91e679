"""Every supported architecture: the GGUF computes what transformers computes, and carries the keys llama.cpp reads.

Each case converts a tiny random checkpoint (testkit/tiny_models.py) and compares llama.cpp's logits over 40 tokens
with transformers'. The tiny configs set values where llama.cpp's defaults differ (soft-caps, windows, rope bases,
query scales), so a metadata key or tensor transform the converter gets wrong shows in the logits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ewq_gguf.api import convert
from ewq_gguf.arch.registry import adapter_for, supported_architectures
from ewq_gguf.errors import InputError
from llama_runner import gguf_logits, relative_error
from testkit.tiny_models import TINY, make_tiny_model, read_config

# tokenisation of text is tested elsewhere; these tests feed token ids
pytestmark = pytest.mark.filterwarnings("ignore::ewq_gguf.source.tokenizer.TokenizerWarning")

SHORT = 40
LONG = 300   # beyond the longrope variant's original context (256), so llama.cpp and HF both use the long factors

# Phi-4-mini-like rope: partial rotary (48 of 64 dims) and LongRoPE with distinct short and long factors
N_ROPE_FACTORS = 24
LONGROPE = dict(max_position_embeddings=1024, original_max_position_embeddings=256, rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
    "original_max_position_embeddings": 256,
    "short_factor": [1 + 0.05 * i for i in range(N_ROPE_FACTORS)],
    "long_factor": [1 + 0.5 * i for i in range(N_ROPE_FACTORS)]})
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"longrope": ("Phi3ForCausalLM", LONGROPE)}

# llama.cpp's gemma graphs use GELU, which its CPU backend reads from a table indexed by the input rounded to F16
GGML_GELU_ARCHITECTURES = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}

CASES = ([pytest.param(arch, None, SHORT, id=arch) for arch in supported_architectures()]
         + [pytest.param("Phi3ForCausalLM", "longrope", SHORT, id="Phi3ForCausalLM-longrope-short"),
            pytest.param("Phi3ForCausalLM", "longrope", LONG, id="Phi3ForCausalLM-longrope-long")])


def tokens(count: int) -> list[int]:
    return [(7 * i + 3) % 200 + 5 for i in range(count)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Factory: (architecture, variant) -> tiny checkpoint folder, made once per module."""
    made: dict[tuple[str, Optional[str]], Path] = {}

    def make(architecture: str, variant: Optional[str] = None) -> Path:
        key = (architecture, variant)
        if key not in made:
            overrides = VARIANTS[variant][1] if variant else {}
            folder = tmp_path_factory.mktemp(f"tiny-{architecture}-{variant or 'plain'}")
            made[key] = make_tiny_model(folder, architecture, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    """Factory: (architecture, variant, type) -> GGUF of the tiny checkpoint, converted once per module."""
    made: dict[tuple[str, Optional[str], str], Path] = {}

    def make(architecture: str, variant: Optional[str] = None, type_name: str = "F32") -> Path:
        key = (architecture, variant, type_name)
        if key not in made:
            out = tmp_path_factory.mktemp("gguf") / f"{architecture}-{variant or 'plain'}-{type_name}.gguf"
            made[key] = convert(tiny(architecture, variant), out, "uniform", type=type_name, progress=False).path
        return made[key]

    return make


class GgmlCpuGelu(torch.nn.Module):
    """GELU as ggml's CPU backend computes it: tanh-approximated, looked up by the input rounded to F16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def reference_logits(model_dir: Path, architecture: str, token_ids: list[int]) -> np.ndarray:
    """transformers' logits; for GELU models with llama.cpp's F16-table GELU, which alone costs ~2e-4."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if architecture in GGML_GELU_ARCHITECTURES:
        for layer in model.model.layers:
            layer.mlp.act_fn = GgmlCpuGelu()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def test_every_supported_architecture_has_a_tiny_model():
    assert set(supported_architectures()) <= set(TINY)


@pytest.mark.parametrize("type_name, tolerance", [("F32", 1e-4), ("F16", 1e-2)])
@pytest.mark.parametrize("architecture, variant, n_tokens", CASES)
def test_gguf_logits_match_transformers(tiny, tiny_gguf, architecture, variant, n_tokens, type_name, tolerance):
    token_ids = tokens(n_tokens)
    reference = reference_logits(tiny(architecture, variant), architecture, token_ids)
    error = relative_error(gguf_logits(tiny_gguf(architecture, variant, type_name), token_ids), reference)
    assert error <= tolerance, f"{architecture} {variant or ''} {type_name}: relative error {error:.2e}"


def expected_fields(architecture: str, config: dict[str, Any]) -> dict[str, Any]:
    """Metadata values (key without the architecture prefix) that the GGUF of `config` must carry."""
    fields: dict[str, Any] = {"block_count": config["num_hidden_layers"], "embedding_length": config["hidden_size"],
                              "attention.head_count": config["num_attention_heads"],
                              "attention.head_count_kv": config["num_key_value_heads"]}
    if architecture in ("Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        fields.update({"attention.key_length": config["head_dim"], "attention.value_length": config["head_dim"]})
    if architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        fields.update({"final_logit_softcapping": config["final_logit_softcapping"],
                       "attention.sliding_window": config["sliding_window"],
                       "attention.sliding_window_pattern": [kind == "sliding_attention"
                                                            for kind in config["layer_types"]]})
    if architecture == "Gemma2ForCausalLM":
        fields["attn_logit_softcapping"] = config["attn_logit_softcapping"]
    if architecture == "Gemma3ForCausalLM":
        rope = config["rope_parameters"]
        fields.update({"rope.freq_base": rope["full_attention"]["rope_theta"],
                       "rope.freq_base_swa": rope["sliding_attention"]["rope_theta"],
                       "rope.scaling.type": "linear", "rope.scaling.factor": rope["full_attention"]["factor"]})
    return fields


# architecture -> (tensors the GGUF must have, tensors it must not have)
EXPECTED_TENSORS: dict[str, tuple[set[str], set[str]]] = {
    "Qwen2ForCausalLM": ({"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"}, set()),
    "Qwen3ForCausalLM": ({"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}, {"output.weight"}),
    "GemmaForCausalLM": (set(), {"output.weight"}),
    "Gemma2ForCausalLM": ({"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"}, {"output.weight"}),
    "Gemma3ForCausalLM": ({"blk.0.attn_q_norm.weight", "blk.0.post_ffw_norm.weight"}, {"output.weight"}),
    "Phi3ForCausalLM": ({"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"},
                        {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "rope_factors_long.weight"}),
}


@pytest.mark.parametrize("architecture", supported_architectures())
def test_metadata_and_tensors(tiny, tiny_gguf, architecture):
    config = read_config(tiny(architecture))
    reader = gguf.GGUFReader(tiny_gguf(architecture))
    arch_name = adapter_for(config).arch_name
    assert reader.fields["general.architecture"].contents() == arch_name
    for key, value in expected_fields(architecture, config).items():
        field = reader.fields.get(f"{arch_name}.{key}")
        assert field is not None, f"{arch_name}.{key} missing"
        assert field.contents() == (pytest.approx(value) if isinstance(value, float) else value), key
    names = {tensor.name for tensor in reader.tensors}
    present, absent = EXPECTED_TENSORS.get(architecture, (set(), set()))
    assert present <= names and not (absent & names)
    if architecture == "Gemma2ForCausalLM":
        assert "gemma2.rope.freq_base_swa" not in reader.fields   # llama.cpp then uses the global base, as HF


@pytest.mark.parametrize("architecture", ["GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_gemma_norms_are_stored_plus_one(tiny, tiny_gguf, architecture):
    checkpoint = load_file(tiny(architecture) / "model.safetensors")
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(tiny_gguf(architecture)).tensors}
    np.testing.assert_allclose(np.asarray(tensors["output_norm.weight"].data),
                               checkpoint["model.norm.weight"].numpy() + 1, rtol=0, atol=1e-7)


def test_phi3_longrope_metadata_and_factors(tiny, tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf("Phi3ForCausalLM", "longrope"))
    fields = {key: field.contents() for key, field in reader.fields.items() if key.startswith("phi3.rope")}
    rope = LONGROPE["rope_parameters"]
    factor = LONGROPE["max_position_embeddings"] / LONGROPE["original_max_position_embeddings"]
    assert fields["phi3.rope.dimension_count"] == 2 * N_ROPE_FACTORS
    assert fields["phi3.rope.scaling.type"] == "longrope"
    assert fields["phi3.rope.scaling.original_context_length"] == LONGROPE["original_max_position_embeddings"]
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(
        np.sqrt(1 + np.log(factor) / np.log(LONGROPE["original_max_position_embeddings"])))
    tensors = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    np.testing.assert_allclose(tensors["rope_factors_long.weight"], rope["long_factor"], rtol=1e-6)
    np.testing.assert_allclose(tensors["rope_factors_short.weight"], rope["short_factor"], rtol=1e-6)


def edited_config(tiny, architecture: str, **changes: Any) -> dict[str, Any]:
    return {**json.loads((tiny(architecture) / "config.json").read_text()), **changes}


@pytest.mark.parametrize("architecture, changes, message", [
    ("Qwen2ForCausalLM", dict(use_sliding_window=True), "sliding-window"),
    ("Qwen3ForCausalLM", dict(layer_types=["sliding_attention", "full_attention"]), "sliding-window"),
    ("Qwen3ForCausalLM", dict(attention_bias=True), "attention_bias"),
    ("GemmaForCausalLM", dict(tie_word_embeddings=False), "untied"),
    ("Gemma2ForCausalLM", dict(final_logit_softcapping=None), "final_logit_softcapping"),
    ("Gemma2ForCausalLM", dict(layer_types=["full_attention"]), "layer_types"),
    ("Gemma3ForCausalLM", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("Phi3ForCausalLM", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope type"),
    ("Phi3ForCausalLM", dict(rope_parameters={**LONGROPE["rope_parameters"], "long_factor": [1.0]}), "long_factor"),
])
def test_configs_llama_cpp_cannot_run_are_refused(tiny, architecture, changes, message):
    config = edited_config(tiny, architecture, **changes)
    with pytest.raises(InputError, match=message):
        adapter_for(config).extra_tensors()


def test_gemma2_query_scale_is_folded_into_q(tiny):
    """HF scales queries by query_pre_attn_scalar^-1/2, llama.cpp by head_dim^-1/2 (hidden/heads at 46 blocks)."""
    config = edited_config(tiny, "Gemma2ForCausalLM")
    weight = torch.ones(4, 4)
    folded = adapter_for(config).transform("blk.0.attn_q.weight", weight)
    assert torch.allclose(folded, weight * (config["head_dim"] / config["query_pre_attn_scalar"]) ** 0.5)
    same_scale = edited_config(tiny, "Gemma2ForCausalLM", query_pre_attn_scalar=config["head_dim"])
    assert adapter_for(same_scale).transform("blk.0.attn_q.weight", weight) is weight
    as_27b = edited_config(tiny, "Gemma2ForCausalLM", num_hidden_layers=46, layer_types=None,
                           query_pre_attn_scalar=config["hidden_size"] // config["num_attention_heads"])
    assert adapter_for(as_27b).transform("blk.0.attn_q.weight", weight) is weight


def metadata_of(config: dict[str, Any]) -> dict[str, Any]:
    writer = gguf.GGUFWriter(None, adapter_for(config).arch_name)
    adapter_for(config).add_metadata(writer)
    return {key: field.value for key, field in writer.kv_data[0].items()}


def test_older_config_spellings():
    """config.json as transformers 4.x saved Gemma 3 1B and Phi-3-mini-128k (rope_scaling, no layer_types)."""
    gemma3 = metadata_of({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 1000,
        "query_pre_attn_scalar": 256, "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
        "sliding_window": 512, "sliding_window_pattern": 6})
    assert gemma3["gemma3.rope.freq_base"] == 1e6 and gemma3["gemma3.rope.freq_base_swa"] == 1e4
    assert gemma3["gemma3.attention.sliding_window"] == 512
    assert gemma3["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False] + [True] * 2
    factors = [1.0] * 48
    phi3 = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 1000,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
            "rope_scaling": {"type": "su", "long_factor": factors, "short_factor": factors}}
    fields = metadata_of(phi3)
    assert fields["phi3.rope.scaling.type"] == "longrope"
    assert fields["phi3.rope.scaling.original_context_length"] == 4096
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    assert [tensor.shape for tensor in adapter_for(phi3).extra_tensors()] == [(48,), (48,)]
