"""The one table of supported architectures: config.json "architectures" name -> adapter class."""
from __future__ import annotations

from typing import Any

from ..errors import UnsupportedArchitectureError
from .base import Adapter
from .gemma import Gemma2Adapter, Gemma3Adapter, GemmaAdapter
from .llama import LlamaAdapter
from .phi3 import Phi3Adapter
from .qwen import Qwen2Adapter, Qwen3Adapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlamaAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
    GemmaAdapter,
    Gemma2Adapter,
    Gemma3Adapter,
    Phi3Adapter,
)

BY_HF_NAME: dict[str, type[Adapter]] = {name: adapter for adapter in ADAPTERS for name in adapter.architectures}


def supported_architectures() -> list[str]:
    return sorted(BY_HF_NAME)


def has_adapter(config: dict[str, Any]) -> bool:
    """Whether one of our adapters reads this config.json (else llama.cpp's converter does: source/converter.py)."""
    names = config.get("architectures")
    return isinstance(names, list) and any(name in BY_HF_NAME for name in names if isinstance(name, str))


def adapter_for(config: dict[str, Any]) -> Adapter:
    """The adapter for a checkpoint's config.json, or UnsupportedArchitectureError listing what is supported."""
    names = config.get("architectures") or []
    for name in names:
        if name in BY_HF_NAME:
            return BY_HF_NAME[name](config)
    shown = ", ".join(names) if names else "none named in config.json"
    raise UnsupportedArchitectureError(
        f"unsupported architecture ({shown}); supported: {', '.join(supported_architectures())}")
