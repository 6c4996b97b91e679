#!/usr/bin/env bash
# Creates .venv (if missing) and installs ewq-gguf into it with the given extras.
# torch is pinned to the CPU wheel here (pyproject's requirement stays loose for users who bring their own build).
# llama-cpp-python builds from source the first time (about 6 minutes on 2 cores); pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
