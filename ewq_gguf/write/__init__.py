"""WRITE: stream tensors through a Plan into a GGUF file, safely; and the Ollama Modelfile beside it."""
from .file import WrittenFile, check_output, parse_size, verify, write_gguf
from .modelfile import write_ollama_modelfile

__all__ = ["WrittenFile", "check_output", "parse_size", "verify", "write_gguf", "write_ollama_modelfile"]
