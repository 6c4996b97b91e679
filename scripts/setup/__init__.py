"""Setting up a development machine: env.sh (.venv with extras and llama.cpp's gguf-py), text.sh (Debian's reference
manual) and `python -m scripts.setup.make_dev_model` (the development models)."""
