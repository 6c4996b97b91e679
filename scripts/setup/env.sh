#!/usr/bin/env bash
# Creates .venv (if missing) and installs ewq-gguf into it with the given extras.
# torch is pinned to the CPU wheel here (pyproject's requirement stays loose for users who bring their own build).
# llama-cpp-python builds from source the first time (about 6 minutes on 2 cores); pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
extras=${1:-}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
# the gguf-py of the llama.cpp tree that llama-cpp-python was built from (fetched once into the per-user cache):
# llama.cpp's converter, which reads most architectures (ewq_gguf/source/converter.py), needs that very version
eval "$(.venv/bin/python -m ewq_gguf.llamacpp env --fetch)"
.venv/bin/python -m pip install -q --no-deps "$LLAMA_GGUF_PY"
