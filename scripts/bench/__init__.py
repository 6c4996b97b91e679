"""Benchmarks: `python -m scripts.bench.NAME --help`. Each writes its own docs/results.md section (through
scripts.common.results_file), headed by the command that reproduces it."""
