"""Llama family: Llama 2 and 3 (incl. Llama-3 rope scaling), SmolLM, TinyLlama, Mistral."""
from __future__ import annotations

import gguf
import torch

from .base import Adapter, ExtraTensor, llama3_rope_factors, unpermute_rope_rows
from .registry import register_adapter


@register_adapter("LlamaForCausalLM", "MistralForCausalLM")
class LlamaAdapter(Adapter):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        n_heads = int(self.config["num_attention_heads"])
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return unpermute_rope_rows(tensor, n_heads)
        if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return unpermute_rope_rows(tensor, int(self.config.get("num_key_value_heads") or n_heads))
        return tensor

    def extra_tensors(self) -> list[ExtraTensor]:
        rope_factors = llama3_rope_factors(self.config, self.head_dim())
        return [rope_factors] if rope_factors else []
