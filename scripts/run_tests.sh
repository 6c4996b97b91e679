#!/usr/bin/env bash
# Installs ewq-gguf with its test extras into .venv, makes what the tests check against, and runs the test suite
# (CPU only). What it makes, each once per machine or clone and reused afterwards:
#   - llama.cpp's tools (llama-quantize, ...), built from the llama.cpp that llama-cpp-python vendors, in the
#     per-user cache (vendor/build_llama_tools.sh; about 5 minutes the first time on 2 cores)
#   - the SmolLM2-135M development model (scripts/setup/make_dev_model.py, about 40 s; under models/, or
#     EWQ_DEV_MODELS)
#   - Debian's reference manual, the English text the perplexity tests read (where apt-get can install it)
# With CI=true the tests that need the model or the tools fail, instead of skipping, when either is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup/env.sh test
bash scripts/setup/text.sh
bash vendor/build_llama_tools.sh > /dev/null
models=$(.venv/bin/python -c "from ewq_gguf.devenv import dev_model; print(dev_model('smollm2'))")
[ -f "$models/model.safetensors" ] || .venv/bin/python -m scripts.setup.make_dev_model "$models" --model smollm2
echo "prepared in $(( $(date +%s) - start )) s"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
echo "total $(( $(date +%s) - start )) s"
exit $status
