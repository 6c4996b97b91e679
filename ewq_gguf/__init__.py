"""ewq-gguf: Hugging Face checkpoints to mixed-precision GGUF files, planned from measurements."""
__version__ = "0.1.0"
