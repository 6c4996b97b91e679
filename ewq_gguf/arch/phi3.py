"""Phi-3 family: Phi-3 / Phi-3.5 mini and medium, Phi-4 mini (partial rotary), incl. LongRoPE ("su") scaling.

The checkpoint's fused tensors are what llama.cpp's phi3 graph reads: qkv_proj -> attn_qkv (rows q | k | v) and
gate_up_proj -> ffn_up (rows gate | up, split in that order by its SwiGLU), both named by TensorNameMap. Rope is
NEOX-style, so no rows move. LongRoPE's per-frequency factors become the rope_factors_long / rope_factors_short
tensors; llama.cpp picks the long ones when the context is longer than the original training context, as HF does
when the sequence is.
"""
from __future__ import annotations

import functools
import math

import gguf
import torch

from ..errors import InputError
from .base import Adapter, Config, ExtraTensor, rope_parameters
from .registry import register_adapter

LONGROPE_TYPES = ("longrope", "su")


@register_adapter("Phi3ForCausalLM")
class Phi3Adapter(Adapter):
    gguf_arch = gguf.MODEL_ARCH.PHI3

    def __init__(self, config: Config):
        super().__init__(config)
        self.rope = rope_parameters(config)
        rope_type = self.rope.get("rope_type")
        if rope_type not in (None, "default", *LONGROPE_TYPES):
            raise InputError(f"rope type '{rope_type}' is not supported for {self.arch_name}")
        if self.head_dim() * int(config["num_attention_heads"]) != int(config["hidden_size"]):
            raise InputError("llama.cpp's phi3 graph needs head_dim * num_attention_heads == hidden_size")

    @property
    def is_longrope(self) -> bool:
        return self.rope.get("rope_type") in LONGROPE_TYPES

    def rope_dimension_count(self) -> int:
        partial = self.rope.get("partial_rotary_factor", self.config.get("partial_rotary_factor", 1.0))
        return int(self.head_dim() * float(partial))

    def original_context(self) -> int:
        return int(self.rope.get("original_max_position_embeddings")
                   or self.config.get("original_max_position_embeddings")
                   or self.config["max_position_embeddings"])

    def attention_factor(self) -> float:
        """LongRoPE's cos/sin scale, as transformers derives it when the config does not give it."""
        if self.rope.get("attention_factor") is not None:
            return float(self.rope["attention_factor"])
        factor = float(self.rope.get("factor") or self.config["max_position_embeddings"] / self.original_context())
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_context()))

    def add_rope_metadata(self, writer: gguf.GGUFWriter) -> None:
        writer.add_rope_freq_base(float(self.rope.get("rope_theta", 10000.0)))
        if self.is_longrope:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            writer.add_rope_scaling_attn_factors(self.attention_factor())
            writer.add_rope_scaling_orig_ctx_len(self.original_context())

    def extra_tensors(self) -> list[ExtraTensor]:
        if not self.is_longrope:
            return []
        n_factors = self.rope_dimension_count() // 2
        tensors = []
        for kind, tensor_type in (("long", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                                  ("short", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            factors = self.rope.get(f"{kind}_factor")
            if factors is None or len(factors) != n_factors:
                raise InputError(f"longrope needs {n_factors} {kind}_factor values in config.json, "
                                 f"found {0 if factors is None else len(factors)}")
            make = functools.partial(torch.tensor, list(factors), dtype=torch.float32)
            tensors.append(ExtraTensor(gguf.TENSOR_NAMES[tensor_type] + ".weight", make, (n_factors,)))
        return tensors
