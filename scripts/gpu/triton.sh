#!/usr/bin/env bash
# GPU check of the quantizers on CUDA (the fused Triton kernels of ewq_gguf/quant/triton_kernels.py, and the torch
# codec of MXFP4, which has no kernel), for the device machine: one H100 or H200, no internet, the repository as
# working directory and the gguf wheel in .device/. Run:
#   bash scripts/gpu/triton.sh
# It prints the triton version, runs tests/test_quant_triton.py on CUDA, then MXFP4's byte-identity tests on CUDA
# against ggml_quantize_chunk (tests/test_quant_parity.py and tests/test_quant_mxfp4.py, every input class), then a
# table of MB/s of float32 input of quantize() on CUDA: the torch codecs (backend="torch", unfused) against the
# default path (backend="auto", the fused kernels where the type has one), each with "same bytes" against our torch
# codecs on the CPU, which the CPU test suite proves equal to ggml_quantize_chunk's. ggml itself comes from the
# llama-cpp-python that `bash scripts/gpu/check.sh ppl` builds into $EWQ_DEVICE_CACHE (run it first on the same
# warm machine), or from the folder EWQ_LLAMA_CPP names that holds an installed llama_cpp package (its libggml-base
# is plain x86-64 CPU code: the one built here serves, carried in .device/); without either the MXFP4 tests are
# skipped. Then GPTQ rounding on CUDA against the CPU (tests/test_quant_gptq.py -k cuda). Takes under 6 minutes.
# The wheel is installed into a fresh `mktemp -d` folder each run (it takes seconds), removed at the end.
set -uo pipefail
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d) || exit 1
trap 'rm -rf "$WORK"' EXIT
python3 -m pip install -q --no-index --no-deps --target "$WORK/site" .device/gguf-*.whl || exit 1
export PYTHONPATH=$WORK/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)" || exit 1

echo "== CUDA tests (tests/test_quant_triton.py)"
timeout 130 python3 -m pytest -q tests/test_quant_triton.py 2>&1 | tail -15

echo "== MXFP4 on CUDA against ggml (tests/test_quant_parity.py, tests/test_quant_mxfp4.py)"
LLAMA=${EWQ_LLAMA_CPP:-${EWQ_DEVICE_CACHE:-$HOME/.cache/ewq-gguf-device}/llama_cpp_python-0.3.36}
if [ -d "$LLAMA/llama_cpp/lib" ]; then
  # only its libggml-base is loaded (ewq_gguf.quant.ggml_backend finds it without importing llama_cpp)
  PYTHONPATH=$PYTHONPATH:$LLAMA timeout 150 python3 -m pytest -q -rs tests/test_quant_parity.py \
    tests/test_quant_mxfp4.py -k "MXFP4 and cuda" 2>&1 | tail -8
else
  echo "skipped: no llama-cpp-python build at $LLAMA (bash scripts/gpu/check.sh ppl makes it)"
fi

echo "== GPTQ rounding on CUDA against the CPU (tests/test_quant_gptq.py -k cuda)"
timeout 120 python3 -m pytest -q tests/test_quant_gptq.py -k cuda 2>&1 | tail -8

echo "== throughput, MB/s of float32 input"
timeout 100 python3 - <<'PY'
import time

import torch

from ewq_gguf import quant
from ewq_gguf.quant import QType, quantize

CASES = [(QType.Q8_0, False), (QType.Q4_K, False), (QType.Q4_K, True), (QType.Q5_K, False), (QType.Q5_K, True),
         (QType.MXFP4, False)]


def seconds(run, repeat):
    """Best wall time of repeat runs on the GPU (synchronised), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


header = ["rows x columns", "type", "imatrix", "path of auto", "torch CUDA (unfused)", "auto CUDA (fused)",
          "speed-up", "first call s", "same bytes fused", "same bytes unfused", "CPU torch s"]
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for n_rows, n_columns in ((4096, 4096), (16384, 4096)):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(n_rows, n_columns, generator=generator) * 0.02
    importance = torch.exp(torch.randn(n_columns, generator=generator) * 1.5)
    rows_gpu, importance_gpu = rows.cuda(), importance.cuda()
    megabytes = rows.numel() * 4 / 1e6
    for qtype, weighted in CASES:
        weights, weights_gpu = (importance, importance_gpu) if weighted else (None, None)
        if quant._fused_kernels(rows_gpu.device, qtype) is not None:
            path = "fused"
        else:
            path = "torch (no triton)" if quant._triton_kernels() is None else "torch (no kernel for the type)"
        first_s, _ = seconds(lambda: quantize(rows_gpu, qtype, weights_gpu), 1)  # compiles on first use
        fused_s, fused = seconds(lambda: quantize(rows_gpu, qtype, weights_gpu), 3)
        quantize(rows_gpu, qtype, weights_gpu, backend="torch")  # warm-up
        torch_s, unfused = seconds(lambda: quantize(rows_gpu, qtype, weights_gpu, backend="torch"), 2)
        start = time.perf_counter()
        reference = quantize(rows, qtype, weights, backend="torch")
        cpu_s = time.perf_counter() - start
        cells = [f"{n_rows}x{n_columns}", qtype.name, "yes" if weighted else "no", path,
                 f"{megabytes / torch_s:.0f}", f"{megabytes / fused_s:.0f}", f"{torch_s / fused_s:.1f}",
                 f"{first_s:.1f}", "yes" if torch.equal(fused.cpu(), reference) else "NO",
                 "yes" if torch.equal(unfused.cpu(), reference) else "NO", f"{cpu_s:.1f}"]
        print("| " + " | ".join(cells) + " |")
print(f"{torch.cuda.get_device_name()}; N(0, 0.02) input, imatrix exp(N(0, 1.5)); best of 3 (fused) and 2 "
      "(unfused) synchronised runs; 'first call' includes compiling the kernel (cached on disk by triton).")
PY
