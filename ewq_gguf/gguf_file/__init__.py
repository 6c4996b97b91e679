"""GGUF FILES: our side of the file format, in one place.

read.py reads any GGUF file's header (metadata, tensor table); header.py lays out the header of the files we write
(our ewq.* keys, the tensor table, the file's size) for both writing and size prediction; inspect.py summarises a
file for `ewq-gguf inspect`. None of them imports torch, so `inspect` and the validation commands start at once.
"""
from .read import GgufFile, TensorInfo, read_gguf

__all__ = ["GgufFile", "TensorInfo", "read_gguf"]
