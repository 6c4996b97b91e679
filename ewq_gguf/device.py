"""Where tensor work runs: the GPU when there is one (or when asked), the CPU otherwise."""
from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device '{name}' (use auto, cpu or cuda)") from exc
