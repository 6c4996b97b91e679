"""VALIDATE: perplexity and KL divergence of GGUF files through llama.cpp.

This package reads GGUF files only (through gguf_file) and never imports the converter, so it judges any GGUF, ours
or llama.cpp's.
"""
from ewq_gguf.validate.compare import (
    CompareReport,
    compare,
    format_compare_table,
    plot_size_vs_kld,
    require_matplotlib,
)
from ewq_gguf.validate.perplexity import PerplexityReport, format_perplexity, perplexity

__all__ = [
    "CompareReport",
    "PerplexityReport",
    "compare",
    "format_compare_table",
    "format_perplexity",
    "perplexity",
    "plot_size_vs_kld",
    "require_matplotlib",
]
