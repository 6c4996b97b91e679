"""READ: a model, from wherever it lives, as the one SourceModel every later stage sees (model.py): ordered GGUF
tensor specs, a loader that reads one tensor at a time, and the metadata and tokenizer to write.

Three routes make one: a checkpoint folder (checkpoint.py, its headers validated by safetensors_header.py) through
our architecture adapters (model.open_checkpoint); the same folder through llama.cpp's own converter, for every other
architecture (converter.open_converted); and a transformers or PEFT model in memory (live.open_live). tokenizer.py
turns a Hugging Face tokenizer into GGUF vocabulary metadata.
"""
