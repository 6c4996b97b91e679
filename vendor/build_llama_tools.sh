#!/usr/bin/env bash
# Builds llama.cpp's own command-line tools (llama-quantize, llama-perplexity, llama-imatrix, llama-gguf-split),
# CPU only, from the llama.cpp tree that the installed llama-cpp-python was built from. These tools are the external
# reference that tests and benchmarks compare ewq-gguf against.
#
# Where the source comes from and where the tools go is decided in one place, ewq_gguf/llamacpp.py (a per-user
# cache keyed by the llama-cpp-python version; EWQ_LLAMA_CPP and EWQ_LLAMA_BIN override it). Reruns skip the build
# when every tool is there, so a second clone of the repository on the same machine builds nothing.
# Knobs: PYTHON (default .venv/bin/python, which must have ewq-gguf installed), BUILD_JOBS (default: all cores),
# GGML_NATIVE (default ON: the tools only run on this machine, and native SIMD makes perplexity runs faster).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
jobs="${BUILD_JOBS:-$(nproc)}"
tools=(llama-quantize llama-perplexity llama-imatrix llama-gguf-split)

env_file="$(mktemp)"; trap 'rm -f "$env_file"' EXIT
"$python" -m ewq_gguf.llamacpp env --fetch > "$env_file"
# shellcheck disable=SC1090
. "$env_file"

missing=0
for tool in "${tools[@]}"; do [[ -x "$LLAMA_BIN_DIR/$tool" ]] || missing=1; done
if (( missing )); then
    echo "[build] llama.cpp of llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: Release, CPU only, GGML_NATIVE=${GGML_NATIVE:-ON}, -j$jobs"
    start=$(date +%s)
    # Static libraries keep the copied binaries self-contained (no rpath into the build tree). LLAMA_CURL is
    # ignored by current llama.cpp and passed so that older trees never link libcurl.
    cmake -S "$LLAMA_CPP_SRC" -B "$LLAMA_BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE="${GGML_NATIVE:-ON}" \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON > "$LLAMA_BUILD_DIR.configure.log" 2>&1 \
        || { cat "$LLAMA_BUILD_DIR.configure.log" >&2; exit 1; }
    cmake --build "$LLAMA_BUILD_DIR" --config Release -j "$jobs" --target "${tools[@]}" > "$LLAMA_BUILD_DIR.build.log" 2>&1 \
        || { tail -40 "$LLAMA_BUILD_DIR.build.log" >&2; exit 1; }
    mkdir -p "$LLAMA_BIN_DIR"
    # copy under temporary names, then rename: a tool that exists is complete
    for tool in "${tools[@]}"; do
        cp "$LLAMA_BUILD_DIR/bin/$tool" "$LLAMA_BIN_DIR/.$tool.partial" && mv "$LLAMA_BIN_DIR/.$tool.partial" "$LLAMA_BIN_DIR/$tool"
    done
    echo "[build] done in $(( $(date +%s) - start )) s"
fi
"$python" -m ewq_gguf.llamacpp
