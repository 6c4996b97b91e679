#!/usr/bin/env bash
# Installs ewq-gguf with its test extras into .venv and runs the test suite (CPU only, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
.venv/bin/python -m pytest -q "$@"
