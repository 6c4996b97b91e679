"""GGUF FILES: our side of the file format. Reading any GGUF file's header (metadata, tensor table) and summarising it.

Light by design: no torch, so that `ewq-gguf inspect` and the validation commands start at once.
"""
from .read import GgufFile, TensorInfo, read_gguf

__all__ = ["GgufFile", "TensorInfo", "read_gguf"]
