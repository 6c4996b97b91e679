"""Examples of the Python API, kept runnable: `python -m scripts.examples.finetune_export` is the README's code."""
