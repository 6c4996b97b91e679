"""Qwen family: Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head q/k RMS norms, free head_dim).

llama.cpp runs both with NEOX-style rope (rotate-half, as in HF), so Q/K rows keep their HF order, and the biases and
q/k norms map one to one through gguf-py's TensorNameMap.
"""
from __future__ import annotations

import gguf

from ..errors import InputError
from .base import Adapter, Config
from .registry import register_adapter


def reject_sliding_window(config: Config, arch_name: str) -> None:
    """llama.cpp's qwen2/qwen3 graphs attend to the whole context; a checkpoint trained with a window cannot match."""
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        raise InputError(f"sliding-window attention (use_sliding_window) is not supported by llama.cpp's "
                         f"{arch_name} architecture")


@register_adapter("Qwen2ForCausalLM")
class Qwen2Adapter(Adapter):
    gguf_arch = gguf.MODEL_ARCH.QWEN2

    def __init__(self, config: Config):
        super().__init__(config)
        reject_sliding_window(config, self.arch_name)


@register_adapter("Qwen3ForCausalLM")
class Qwen3Adapter(Qwen2Adapter):
    gguf_arch = gguf.MODEL_ARCH.QWEN3

    def __init__(self, config: Config):
        super().__init__(config)
        if config.get("attention_bias"):
            # llama.cpp's qwen3 graph has no bias on the attention output projection
            raise InputError("Qwen3 checkpoints with attention_bias are not supported by llama.cpp's qwen3 graph")
