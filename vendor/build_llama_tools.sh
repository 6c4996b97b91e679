#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-quantize, llama-perplexity, llama-imatrix,
# llama-gguf-split) from the llama.cpp tree vendored in the llama-cpp-python sdist, CPU only.
# These tools are the external reference the benchmarks compare ewq-gguf against.
#
# Outputs (all under vendor/build/, which git ignores):
#   vendor/build/llama_cpp_python-<version>/   extracted sdist (llama.cpp source, convert_hf_to_gguf.py, gguf-py)
#   vendor/build/cmake/                         cmake build tree
#   vendor/build/bin/                           the four tools
#   vendor/build/paths.env                      shell-sourceable paths (also read by scripts/llama_tools.py)
#
# Idempotent: reuses the downloaded/extracted sdist and skips the build when all tools exist.
# Environment knobs: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), BUILD_JOBS (default 2),
# GGML_NATIVE (default ON: the tools only run on this machine, and native SIMD makes perplexity runs faster).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
BUILD_JOBS="${BUILD_JOBS:-2}"
GGML_NATIVE="${GGML_NATIVE:-ON}"
TOOLS=(llama-quantize llama-perplexity llama-imatrix llama-gguf-split)

VENDOR_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$VENDOR_DIR")"
BUILD_DIR="$VENDOR_DIR/build"
SDIST_NAME="llama_cpp_python-$VERSION"
SDIST_FILE="$SDIST_NAME.tar.gz"
SRC_DIR="$BUILD_DIR/$SDIST_NAME"
LLAMA_DIR="$SRC_DIR/vendor/llama.cpp"
CMAKE_DIR="$BUILD_DIR/cmake"
BIN_DIR="$BUILD_DIR/bin"
SHARED_SDIST_DIR="${LLAMA_SDIST_DIR:-/work/llsdist}"
VENV_PYTHON="$REPO_DIR/.venv/bin/python"

mkdir -p "$BUILD_DIR" "$BIN_DIR"

# 1. Obtain the sdist: build folder first, then the shared download folder, then the registry.
if [[ ! -f "$BUILD_DIR/$SDIST_FILE" ]]; then
    if [[ -f "$SHARED_SDIST_DIR/$SDIST_FILE" ]]; then
        echo "[sdist] copying $SHARED_SDIST_DIR/$SDIST_FILE"
        cp "$SHARED_SDIST_DIR/$SDIST_FILE" "$BUILD_DIR/"
    else
        echo "[sdist] downloading llama-cpp-python==$VERSION from the package registry"
        PIP=(pip)
        [[ -x "$VENV_PYTHON" ]] && PIP=("$VENV_PYTHON" -m pip)
        "${PIP[@]}" download --no-deps --no-binary :all: -d "$BUILD_DIR" "llama-cpp-python==$VERSION"
    fi
else
    echo "[sdist] reusing $BUILD_DIR/$SDIST_FILE"
fi

# 2. Extract (marker file so an interrupted extraction is redone rather than trusted).
if [[ ! -f "$SRC_DIR/.extracted" ]]; then
    echo "[sdist] extracting into $BUILD_DIR"
    rm -rf "$SRC_DIR"
    tar -xzf "$BUILD_DIR/$SDIST_FILE" -C "$BUILD_DIR"
    touch "$SRC_DIR/.extracted"
fi
[[ -f "$LLAMA_DIR/CMakeLists.txt" ]] || { echo "error: no llama.cpp source at $LLAMA_DIR" >&2; exit 1; }

# 3. Record the paths for scripts and shells (before building: the converter is usable already).
CONVERT_SCRIPT="$LLAMA_DIR/convert_hf_to_gguf.py"
GGUF_PY_DIR="$LLAMA_DIR/gguf-py"
cat > "$BUILD_DIR/paths.env" <<EOF
# Written by vendor/build_llama_tools.sh; source it or read it with scripts/llama_tools.py.
LLAMA_CPP_PYTHON_VERSION=$VERSION
LLAMA_CPP_SRC=$LLAMA_DIR
LLAMA_BIN_DIR=$BIN_DIR
LLAMA_QUANTIZE=$BIN_DIR/llama-quantize
LLAMA_PERPLEXITY=$BIN_DIR/llama-perplexity
LLAMA_IMATRIX=$BIN_DIR/llama-imatrix
LLAMA_GGUF_SPLIT=$BIN_DIR/llama-gguf-split
LLAMA_CONVERT_HF=$CONVERT_SCRIPT
LLAMA_GGUF_PY=$GGUF_PY_DIR
EOF

# 4. Build the tools unless every one is already there.
missing=0
for tool in "${TOOLS[@]}"; do
    [[ -x "$BIN_DIR/$tool" ]] || missing=1
done
if (( missing )); then
    echo "[build] configuring llama.cpp in $CMAKE_DIR (Release, CPU only, GGML_NATIVE=$GGML_NATIVE)"
    build_start=$(date +%s)
    # LLAMA_CURL is deprecated (ignored) in current llama.cpp; passed so older trees never link libcurl.
    # Static libraries keep the copied binaries self-contained (no rpath into the cmake tree).
    cmake -S "$LLAMA_DIR" -B "$CMAKE_DIR" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TOOLS=ON \
        -DGGML_NATIVE="$GGML_NATIVE" \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON
    echo "[build] compiling ${TOOLS[*]} with -j$BUILD_JOBS"
    cmake --build "$CMAKE_DIR" --config Release -j "$BUILD_JOBS" --target "${TOOLS[@]}"
    for tool in "${TOOLS[@]}"; do
        cp "$CMAKE_DIR/bin/$tool" "$BIN_DIR/$tool"
    done
    echo "[build] done in $(( $(date +%s) - build_start )) s"
else
    echo "[build] all tools present in $BIN_DIR, skipping build"
fi

echo
echo "llama.cpp source : $LLAMA_DIR"
for tool in "${TOOLS[@]}"; do
    printf '%-17s: %s\n' "$tool" "$BIN_DIR/$tool"
done
echo "convert script   : $CONVERT_SCRIPT"
echo "gguf-py          : $GGUF_PY_DIR"
echo "paths file       : $BUILD_DIR/paths.env"
echo "convert with     : PYTHONPATH=$GGUF_PY_DIR $VENV_PYTHON $CONVERT_SCRIPT <hf-dir> --outtype f32 --outfile <out.gguf>"
