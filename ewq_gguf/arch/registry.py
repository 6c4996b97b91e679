"""Our architecture adapters, one table: each adapter class registers its config.json names with @register_adapter.

The modules of this package are imported the first time the table is read, so a new family is one new file here
(plus its tiny model in testkit/tiny_models.TINY, which tests/test_arch.py requires). An architecture no adapter claims
is read through llama.cpp's converter (source/converter.py).
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Any, Callable

from ..errors import UnsupportedArchitectureError
from .base import Adapter

# config.json "architectures" name -> adapter class, filled as the adapter modules are imported
_REGISTERED: dict[str, type[Adapter]] = {}


def register_adapter(*hf_names: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: the adapter reads checkpoints whose config.json names one of `hf_names`."""

    def enter(adapter: type[Adapter]) -> type[Adapter]:
        for name in hf_names:
            if name in _REGISTERED:
                raise ValueError(f"two adapters register {name}: {_REGISTERED[name].__name__}, {adapter.__name__}")
            _REGISTERED[name] = adapter
        return adapter

    return enter


@lru_cache(maxsize=1)
def adapters() -> dict[str, type[Adapter]]:
    """Every registered adapter by config.json name (imports the package's adapter modules once)."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in ("base", "registry"):
            importlib.import_module(f"{__package__}.{module.name}")
    return dict(_REGISTERED)


def supported_architectures() -> list[str]:
    return sorted(adapters())


def has_adapter(config: dict[str, Any]) -> bool:
    """Whether one of our adapters reads this config.json (else llama.cpp's converter does: source/converter.py)."""
    names = config.get("architectures")
    return isinstance(names, list) and any(name in adapters() for name in names if isinstance(name, str))


def adapter_for(config: dict[str, Any]) -> Adapter:
    """The adapter for a checkpoint's config.json, or UnsupportedArchitectureError listing what is supported."""
    names = config.get("architectures") or []
    for name in names:
        if name in adapters():
            return adapters()[name](config)
    shown = ", ".join(names) if names else "none named in config.json"
    raise UnsupportedArchitectureError(
        f"unsupported architecture ({shown}); supported: {', '.join(supported_architectures())}")
