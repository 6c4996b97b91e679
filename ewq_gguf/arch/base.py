"""What every architecture adapter provides, and the parts most of them share.

An adapter is data-like (registry.register_adapter names the Hugging Face architectures it reads): which gguf-py
MODEL_ARCH it writes, the metadata keys llama.cpp needs, and small value transforms for the tensors whose layout
differs between the two formats.
Tensor names come from gguf-py's TensorNameMap, so adapters never spell GGUF tensor names themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gguf
import torch

from ..errors import InputError

Config = dict[str, Any]


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor llama.cpp needs that the checkpoint does not store (computed from config.json)."""

    name: str
    make: Callable[[], torch.Tensor]
    shape: tuple[int, ...]


def hparam(config: Config, *keys: str, default: Any = None) -> Any:
    """First of keys present in config (HF names differ between families); InputError if required and absent."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise InputError(f"config.json lacks {' / '.join(keys)}")
    return default


def rope_parameters(config: Config) -> dict[str, Any]:
    """Rope settings in transformers 5's `rope_parameters` shape, also from older `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    legacy_scaling = config.get("rope_scaling") or {}
    for key, value in legacy_scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    if "rope_theta" in config:
        params.setdefault("rope_theta", config["rope_theta"])
    return params


class Adapter:
    """Base adapter: a decoder-only transformer that llama.cpp's graph for `gguf_arch` runs."""

    gguf_arch: gguf.MODEL_ARCH
    # checkpoint tensors llama.cpp has no use for (buffers that transformers sometimes saves)
    ignored_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)

    def __init__(self, config: Config):
        self.config = config
        self.n_blocks = int(hparam(config, "num_hidden_layers", "n_layer"))
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_blocks)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # --- names -------------------------------------------------------------------------------------------------
    def gguf_name(self, hf_name: str) -> Optional[str]:
        """GGUF tensor name for a checkpoint tensor, or None when llama.cpp does not use it."""
        if hf_name.endswith(self.ignored_suffixes):
            return None
        name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"tensor '{hf_name}' has no GGUF name for architecture {self.arch_name}")
        return name

    def gguf_names(self, hf_name: str) -> list[str]:
        """Every GGUF tensor made from a checkpoint tensor (one here; llama.cpp's converter splits some fused ones)."""
        name = self.gguf_name(hf_name)
        return [] if name is None else [name]

    # --- values ------------------------------------------------------------------------------------------------
    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor's values as llama.cpp expects them (identity unless the layouts differ)."""
        return tensor

    def extra_tensors(self) -> list[ExtraTensor]:
        return []

    # --- metadata ----------------------------------------------------------------------------------------------
    def head_dim(self) -> int:
        config = self.config
        return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])

    def add_metadata(self, writer: gguf.GGUFWriter) -> None:
        """Hyper-parameters llama.cpp reads for this architecture."""
        config = self.config
        writer.add_block_count(self.n_blocks)
        writer.add_context_length(int(hparam(config, "max_position_embeddings", "n_ctx", default=4096)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
        writer.add_layer_norm_rms_eps(float(hparam(config, "rms_norm_eps", default=1e-6)))
        writer.add_vocab_size(int(config["vocab_size"]))
        head_dim = self.head_dim()
        if head_dim * int(config["num_attention_heads"]) != int(config["hidden_size"]):
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(self.rope_dimension_count())
        self.add_rope_metadata(writer)

    def rope_dimension_count(self) -> int:
        return self.head_dim()

    def add_rope_metadata(self, writer: gguf.GGUFWriter) -> None:
        rope = rope_parameters(self.config)
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        rope_type, factor = rope.get("rope_type"), rope.get("factor")
        if rope_type == "linear" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(factor))
        elif rope_type == "yarn" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(factor))
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        elif rope_type not in (None, "default", "llama3"):
            raise InputError(f"rope type '{rope_type}' is not supported for {self.arch_name}")


def llama3_rope_factors(config: Config, head_dim: int) -> Optional[ExtraTensor]:
    """Llama 3.x frequency-dependent rope scaling, which llama.cpp reads as the `rope_freqs` tensor.

    Wavelengths shorter than original_ctx/high_freq_factor keep their frequency, longer than original_ctx/
    low_freq_factor are divided by `factor`, and the band between is interpolated smoothly (Meta's recipe).
    """
    rope = rope_parameters(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original_ctx = float(rope.get("original_max_position_embeddings", 8192))

    def make() -> torch.Tensor:
        factors = []
        for index in range(0, head_dim, 2):
            wavelength = 2 * math.pi * base ** (index / head_dim)
            if wavelength < original_ctx / high:
                factors.append(1.0)
            elif wavelength > original_ctx / low:
                factors.append(factor)
            else:
                smooth = (original_ctx / wavelength - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        return torch.tensor(factors, dtype=torch.float32)

    return ExtraTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", make, (head_dim // 2,))


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from HF's rotate-half layout to llama.cpp's interleaved pairs.

    HF keeps, within each head, all first halves of the rotary pairs and then all second halves; llama.cpp's
    llama-family graph rotates adjacent pairs. Works for weights (rows x cols) and biases (rows,).
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
