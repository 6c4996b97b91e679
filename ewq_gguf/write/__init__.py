"""WRITE: stream tensors through a Plan into a GGUF file (or llama.cpp's split parts), safely; a Modelfile beside it.

file.py writes, checks and puts the file in place; encode.py turns the model's tensors into the plan's bytes on a
background thread; signals.py turns Ctrl-C and SIGTERM into a clean exit; modelfile.py writes the Ollama Modelfile.
The header itself is laid out by gguf_file.header, which size prediction shares.
"""
from .file import WrittenFile, check_output, parse_size, verify, write_gguf
from .modelfile import write_ollama_modelfile

__all__ = ["WrittenFile", "check_output", "parse_size", "verify", "write_gguf", "write_ollama_modelfile"]
