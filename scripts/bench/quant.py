"""Benchmark: quantizer throughput, MB/s of float32 input, for every quantized type, with and without an imatrix.

Columns: ggml's own encoder through ctypes on one thread (what llama-quantize runs per thread); our torch encoders
on the CPU (torch's default threads); quantize(backend="auto") on the CPU (the native encoders where they cover the
type, else ggml's, on a thread per CPU);
quantize(backend="auto") on CUDA when a GPU is present, the path conversions take there (the fused Triton kernels
for the types they cover when triton is installed, our torch encoders otherwise). Every column's bytes are checked
against ggml's.

    python -m scripts.bench.quant [--rows 4096] [--columns 4096] [--types Q4_K,Q6_K] [--results docs/results.md]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from pathlib import Path

import torch

from ewq_gguf.quant import CODECS, QType, floats, ggml_backend, quantize
from ewq_gguf.quant.chunking import default_threads
from scripts.common.results_file import cpu_name, update_section


def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _best_seconds(run, repeat: int, synchronize=lambda: None) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), None
    for _ in range(repeat):
        synchronize()
        start = time.perf_counter()
        result = run()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=4096, help="a multiple of 256")
    parser.add_argument("--types", help="comma-separated type names (default: every quantized type)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    parser.add_argument("--results", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()

    if not ggml_backend.available():
        sys.exit("llama-cpp-python's libggml-base is needed for the reference column")
    names = args.types.split(",") if args.types else sorted(t.name for t in CODECS if t not in floats.CODECS)
    types = [QType[name.strip().upper()] for name in names]
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(args.rows, args.columns, generator=generator) * 0.02
    importance = torch.exp(torch.randn(args.columns, generator=generator) * 1.5)
    megabytes = rows.numel() * 4 / 1e6
    cuda = torch.cuda.is_available()
    rows_cuda = rows.cuda() if cuda else None
    cpus = default_threads()

    device = f"{cpu_name()}, {cpus} CPUs" + (f"; {torch.cuda.get_device_name()}" if cuda else "")
    load_before = os.getloadavg()
    header = ["type", "imatrix", "ggml 1 thread", f"torch CPU ({torch.get_num_threads()} thr)",
              f"auto CPU ({cpus} thr)"] + (["auto CUDA"] if cuda else []) + ["torch/ggml", "auto/ggml", "same bytes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print(f"{args.rows}x{args.columns} float32 ({megabytes:.0f} MB) on {device}", flush=True)
    print(lines[0], flush=True)
    for qtype in types:
        weightings = (None, importance) if CODECS[qtype].uses_importance else (None,)
        for weights in weightings:
            weights_cuda = None if weights is None or not cuda else weights.cuda()
            ggml_s, reference = _best_seconds(
                lambda: ggml_backend.quantize(rows, qtype, weights, threads=1), args.repeat)
            torch_s, ours = _best_seconds(lambda: quantize(rows, qtype, weights, backend="torch"), args.repeat)
            auto_s, auto = _best_seconds(lambda: quantize(rows, qtype, weights, backend="auto"), args.repeat)
            same = torch.equal(ours, reference) and torch.equal(auto, reference)
            speeds = [megabytes / ggml_s, megabytes / torch_s, megabytes / auto_s]
            if cuda:
                quantize(rows_cuda, qtype, weights_cuda)  # warm-up: compilation, allocator
                cuda_s, on_gpu = _best_seconds(lambda: quantize(rows_cuda, qtype, weights_cuda), args.repeat,
                                               torch.cuda.synchronize)
                same = same and torch.equal(on_gpu.cpu(), reference)
                speeds.append(megabytes / cuda_s)
            cells = [qtype.name, "yes" if weights is not None else "no"] + [f"{speed:.1f}" for speed in speeds]
            cells += [f"{ggml_s / torch_s:.2f}", f"{ggml_s / auto_s:.2f}", "yes" if same else "NO"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    load_after = os.getloadavg()
    notes = [f"{args.rows}x{args.columns} float32 input ({megabytes:.0f} MB), N(0, 0.02); MB/s of float32 input, "
             f"best of {args.repeat}. Device: {device}. Load average (1 min) {load_before[0]:.2f} before, "
             f"{load_after[0]:.2f} after. torch {torch.__version__}"
             + (f", triton {_triton_version()}." if cuda else "."),
             "\"same bytes\": every column's output equals ggml_quantize_chunk's, byte for byte."]
    table = "\n".join(notes + [""] + lines)
    print("\n".join(notes))
    if args.results:
        command = f"python -m scripts.bench.quant --rows {args.rows} --columns {args.columns} --results {args.results}"
        update_section(args.results, f"Quantizer throughput ({device})", table, command=command)


if __name__ == "__main__":
    main()
