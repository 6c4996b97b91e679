"""Parity and identity checks: `python -m scripts.check.NAME --help`. llama_quantize and recipe_roundtrip compare with
llama-quantize and write their docs/results.md sections; identical_outputs hashes every method's files before and
after a change."""
