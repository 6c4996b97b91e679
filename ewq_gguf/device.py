"""Where tensor work runs: the GPU when there is one (or when asked), the CPU otherwise."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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


@contextmanager
def one_torch_thread(device: torch.device) -> Iterator[None]:
    """One torch intra-op thread while working on the CPU, for work made of small or memory-bound operations: several
    threads waiting for each other at every operation made such work several times slower on a shared 2-core machine
    (GPTQ's column steps 6x, the entropy analysis 5-30x, measured)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
