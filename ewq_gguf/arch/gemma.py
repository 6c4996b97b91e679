"""Gemma family: Gemma, Gemma 2 and Gemma 3 (text-only).

What differs from the Llama family, and how llama.cpp's gemma/gemma2/gemma3 graphs want it:
- Gemma's RMSNorm multiplies by (1 + weight), llama.cpp's by weight: every norm weight is stored plus one.
- Rope is NEOX-style (rotate-half, as in HF): Q/K rows keep their order.
- Embeddings are scaled by sqrt(hidden_size) inside llama.cpp's graphs: nothing to write.
- Gemma 1/2 always reuse token_embd as the output matrix; Gemma 3 may have its own.
- Gemma 2/3 scale queries by query_pre_attn_scalar^-1/2 while llama.cpp uses head_dim^-1/2 (hidden/heads for the 27B
  models, which it recognises by block count) and reads no key for it: the ratio is folded into the weights.
- Gemma 2/3 alternate sliding-window and global layers; Gemma 3's sliding layers use their own rope base.
"""
from __future__ import annotations

import math
from typing import Optional

import gguf
import torch

from ..errors import InputError
from .base import Adapter, Config, hparam
from .registry import register_adapter


def sliding_layers(config: Config, n_blocks: int, default_pattern: int) -> list[bool]:
    """Which blocks use sliding-window attention.

    transformers writes `layer_types`; older configs give `sliding_window_pattern` (every n-th block global) or
    nothing, in which case the family's fixed pattern applies.
    """
    layer_types = config.get("layer_types")
    if layer_types:
        if len(layer_types) != n_blocks:
            raise InputError(f"config.json has {len(layer_types)} layer_types for {n_blocks} layers")
        return [kind == "sliding_attention" for kind in layer_types]
    pattern = int(config.get("sliding_window_pattern") or default_pattern)
    return [(block + 1) % pattern != 0 for block in range(n_blocks)]


@register_adapter("GemmaForCausalLM")
class GemmaAdapter(Adapter):
    gguf_arch = gguf.MODEL_ARCH.GEMMA

    def __init__(self, config: Config):
        super().__init__(config)
        has_output = gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS[self.gguf_arch]
        if not has_output and config.get("tie_word_embeddings") is False:
            raise InputError(f"llama.cpp's {self.arch_name} graph always uses the token embeddings as output "
                             "matrix; this checkpoint has untied word embeddings (tie_word_embeddings: false)")

    def gguf_name(self, hf_name: str) -> Optional[str]:
        if hf_name == "lm_head.weight" and gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[self.gguf_arch]:
            return None   # a saved copy of the tied embeddings
        return super().gguf_name(hf_name)

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if gguf_name.endswith("norm.weight"):
            return tensor.float() + 1   # in float32: 1 + w in bf16 would lose most of w's bits
        return tensor


@register_adapter("Gemma2ForCausalLM")
class Gemma2Adapter(GemmaAdapter):
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    default_sliding_pattern = 2
    # llama.cpp takes a model with this many blocks for the 27B one and scales its queries by (hidden/heads)^-1/2
    llama_cpp_27b_blocks = 46
    # where the query scale correction goes: the q projection (Gemma 3: its q norm, which comes after the projection)
    query_scale_tensors: tuple[str, ...] = ("attn_q.weight", "attn_q.bias")

    def __init__(self, config: Config):
        super().__init__(config)
        self.sliding = sliding_layers(config, self.n_blocks, self.default_sliding_pattern)
        if any(self.sliding) and not config.get("sliding_window"):
            raise InputError("config.json has sliding-window layers but no sliding_window size")
        self.check_config()

    def check_config(self) -> None:
        """Refuse what the family's llama.cpp graph cannot compute."""
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if self.config.get(key) is None:
                raise InputError(f"llama.cpp's gemma2 graph always soft-caps; config.json has no {key}")

    def query_scale_correction(self) -> float:
        """Factor that turns llama.cpp's query scale into HF's query_pre_attn_scalar^-1/2."""
        config = self.config
        query_pre_attn_scalar = float(hparam(config, "query_pre_attn_scalar", default=self.head_dim()))
        if self.n_blocks == self.llama_cpp_27b_blocks:
            llama_cpp_scalar = int(config["hidden_size"]) // int(config["num_attention_heads"])
        else:
            llama_cpp_scalar = self.head_dim()
        return math.sqrt(llama_cpp_scalar / query_pre_attn_scalar)

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = super().transform(gguf_name, tensor)
        correction = self.query_scale_correction()
        if correction != 1.0 and gguf_name.endswith(self.query_scale_tensors):
            return tensor.float() * correction
        return tensor

    def add_metadata(self, writer: gguf.GGUFWriter) -> None:
        super().add_metadata(writer)
        config = self.config
        if config.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        if config.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        if any(self.sliding):
            writer.add_sliding_window(int(config["sliding_window"]))
        # explicit per-block flags: llama.cpp's default pattern would otherwise apply
        writer.add_sliding_window_pattern(self.sliding)


@register_adapter("Gemma3ForCausalLM")
class Gemma3Adapter(Gemma2Adapter):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    default_sliding_pattern = 6
    llama_cpp_27b_blocks = 62
    query_scale_tensors = ("attn_q_norm.weight",)

    def check_config(self) -> None:
        if self.config.get("attn_logit_softcapping") is not None:
            raise InputError("llama.cpp's gemma3 graph has no attention soft-capping (attn_logit_softcapping)")
        if self.sliding_rope().get("rope_type", "default") != "default":
            raise InputError("llama.cpp's gemma3 graph supports no rope scaling on sliding-window layers")

    def add_rope_metadata(self, writer: gguf.GGUFWriter) -> None:
        super().add_rope_metadata(writer)
        writer.add_rope_freq_base_swa(float(self.local_rope_base()))

    def sliding_rope(self) -> Config:
        """transformers 5 nests the sliding layers' rope settings in rope_parameters; older configs have none."""
        return (self.config.get("rope_parameters") or {}).get("sliding_attention") or {}

    def local_rope_base(self) -> float:
        """Rope base of the sliding-window layers (older configs call it rope_local_base_freq)."""
        return self.sliding_rope().get("rope_theta") or self.config.get("rope_local_base_freq") or 10000.0
