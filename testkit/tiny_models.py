"""Tiny random Hugging Face checkpoints, one per supported architecture, made on the fly (no download).

Each uses the real transformers config and model classes with small sizes, random weights and a tokenizer trained
on the fly, saved exactly as save_pretrained does. Rows are 256 wide where k-quants need it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from testkit.resources import dev_model
from testkit.tiny_tokenizers import SPM_STYLES, copy_tokenizer, make_bpe_tokenizer, make_spm_tokenizer

COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, rms_norm_eps=1e-5)

# Gemma 2/3 settings where llama.cpp's defaults differ, so a key the converter forgets changes the logits: a query
# scale (query_pre_attn_scalar) other than 1/sqrt(head_dim), soft-caps small enough to bite on random weights, an
# 8-token sliding window that 40 tokens reach beyond, and a layer pattern unlike llama.cpp's default one.
GEMMA2_EXTRAS = dict(head_dim=128, query_pre_attn_scalar=100, sliding_window=8, attn_logit_softcapping=3.0,
                     final_logit_softcapping=8.0, layer_types=["full_attention", "sliding_attention"])
# Gemma 3 also has its own rope base on sliding layers (not llama.cpp's default 10000) and linear rope scaling on
# global layers only, as the 4B+ models do
GEMMA3_EXTRAS = dict(GEMMA2_EXTRAS, attn_logit_softcapping=None, layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                      "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})

# architecture -> (model_type, config overrides, tokenizer style)
TINY: dict[str, tuple[str, dict[str, Any], str]] = {
    "LlamaForCausalLM": ("llama", dict(tie_word_embeddings=False), "llama3"),
    "MistralForCausalLM": ("mistral", dict(sliding_window=None, tie_word_embeddings=False), "llama2"),
    "Qwen2ForCausalLM": ("qwen2", dict(tie_word_embeddings=False), "qwen2"),
    # head_dim 128 differs from hidden/heads = 64; tied embeddings as in the small Qwen3 models
    "Qwen3ForCausalLM": ("qwen3", dict(head_dim=128, tie_word_embeddings=True), "qwen2"),
    "GemmaForCausalLM": ("gemma", dict(head_dim=128), "gemma"),
    "Gemma2ForCausalLM": ("gemma2", GEMMA2_EXTRAS, "gemma"),
    "Gemma3ForCausalLM": ("gemma3_text", GEMMA3_EXTRAS, "gemma"),
    "Phi3ForCausalLM": ("phi3", dict(pad_token_id=None, sliding_window=None, tie_word_embeddings=False), "llama2"),
}

# Architectures that convert through llama.cpp's converter (ewq_gguf/source/converter.py), small but with the features
# that make each one itself: experts routed top-k (shared experts, routers with biases), QK norms, Granite's
# multipliers, gpt-oss's attention sinks and sliding window, LFM2's convolution blocks. Most take the development
# model's tokenizer (SmolLM2's): the converter recognises a BPE pre-tokenizer only by the token ids a known tokenizer
# gives (get_vocab_base_pre), so a vocabulary trained here is unknown to it, as it is to convert_hf_to_gguf.py.
CONVERTED: dict[str, tuple[str, dict[str, Any], str]] = {
    "MixtralForCausalLM": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                           tie_word_embeddings=False), "llama2"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                              shared_expert_intermediate_size=512, tie_word_embeddings=False),
                            "devmodel"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                              head_dim=64, norm_topk_prob=True, tie_word_embeddings=False), "devmodel"),
    "OlmoeForCausalLM": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=4,
                                       tie_word_embeddings=False), "devmodel"),
    # plain rope: with gpt-oss's YaRN, llama.cpp's logits and transformers' differ by 2e-3 (relative), with
    # convert_hf_to_gguf.py's file as with ours: the two implementations of YaRN, not the conversion
    "GptOssForCausalLM": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=64, sliding_window=8,
                                          rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
                                          tie_word_embeddings=False), "devmodel"),
    "Olmo2ForCausalLM": ("olmo2", dict(tie_word_embeddings=False), "devmodel"),
    "GraniteForCausalLM": ("granite", dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                           attention_multiplier=0.1, logits_scaling=4.0, tie_word_embeddings=False),
                           "llama2"),
    # a hybrid: short gated convolutions in some blocks, attention in others
    "Lfm2ForCausalLM": ("lfm2", dict(layer_types=["conv", "full_attention"], block_ff_dim=512,
                                     block_auto_adjust_ff_dim=False, tie_word_embeddings=True), "devmodel"),
}

# Special tokens an architecture's real tokenizers have beyond their tokenizer style. llama.cpp's vocabulary loader
# looks up <|endoftext|> in every model whose general.name contains "phi3".
ADDED_SPECIAL_TOKENS: dict[str, list[str]] = {
    "Phi3ForCausalLM": ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"],
}


def make_tiny_model(out_dir: Path, architecture: str = "LlamaForCausalLM", *, dtype: torch.dtype = torch.float32,
                    seed: int = 0, max_shard_size: Optional[str] = None, tokenizer_style: Optional[str] = None,
                    **overrides: Any) -> Path:
    """Write a tiny random checkpoint of `architecture` into out_dir; returns out_dir. tokenizer_style: another
    tokenizer than the architecture's own (as "devmodel", which llama.cpp's converter recognises)."""
    model_type, arch_overrides, own_style = {**TINY, **CONVERTED}[architecture]
    tokenizer_style = tokenizer_style or own_style
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_style == "devmodel":
        tokenizer = copy_tokenizer(dev_model("smollm2"), out_dir)
    elif tokenizer_style in SPM_STYLES:
        tokenizer = make_spm_tokenizer(out_dir, style=tokenizer_style)
    else:
        tokenizer = make_bpe_tokenizer(out_dir, style=tokenizer_style)
    if architecture in ADDED_SPECIAL_TOKENS:
        add_special_tokens(out_dir, tokenizer, ADDED_SPECIAL_TOKENS[architecture])
    settings = {**COMMON, **arch_overrides, **overrides}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), architectures=[architecture],
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.add_(torch.randn_like(param) * 0.1)   # norms away from 1 so their handling is tested
            elif name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)   # transformers initialises biases to zero
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size or "10GB")
    return out_dir


def add_special_tokens(out_dir: Path, tokenizer: Any, tokens: list[str]) -> None:
    """Add special tokens to the saved tokenizer, keeping the flags save_pretrained drops (they set its behaviour)."""
    config_path = out_dir / "tokenizer_config.json"
    flags = {key: value for key, value in json.loads(config_path.read_text()).items()
             if key in ("legacy", "add_bos_token", "add_eos_token")}
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.save_pretrained(out_dir)
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **flags}, indent=2))


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())
