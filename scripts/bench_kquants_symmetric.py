"""Throughput of our Q6_K / Q3_K encoders against ggml's own (ggml_quantize_chunk through ctypes, one thread).

Prints one table row per type and weighting: MB/s of float32 input (4096 x 4096 by default), ours on the chosen
device with the chosen number of torch threads, and whether the bytes are identical.

    python scripts/bench_kquants_symmetric.py [--threads 2] [--device cuda] [--rows 4096] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from ewq_gguf.quant import kquants_symmetric
from ewq_gguf.quant.ggml_reference import reference_quantize


def _best_seconds(run, repeat: int, synchronize) -> float:
    best = float("inf")
    for _ in range(repeat):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=None, help="values per chunk (overrides the module default)")
    parser.add_argument("--qx-batch", type=int, default=None, help="make_qx_quants groups per batch on CPU")
    parser.add_argument("--types", default="Q6_K,Q3_K")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.chunk:
        kquants_symmetric.CPU_CHUNK_VALUES = kquants_symmetric.GPU_CHUNK_VALUES = args.chunk
    if args.qx_batch:
        kquants_symmetric.QX_CPU_GROUPS_PER_BATCH = args.qx_batch
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(args.rows, args.columns, generator=generator) * 0.02
    importance = torch.exp(torch.randn(args.columns, generator=generator))
    megabytes = rows.numel() * 4 / 1e6

    print(f"{args.rows}x{args.columns} float32 ({megabytes:.0f} MB); ours on {device} with {args.threads} torch "
          f"thread(s), ggml with 1 thread")
    print(f"{'type':6} {'imatrix':8} {'ggml MB/s':>10} {'ours MB/s':>10} {'ours/ggml':>10}  identical")
    for name in args.types.split(","):
        qtype = QType[name]
        codec = kquants_symmetric.CODECS[qtype]
        for weights in (None, importance):
            reference = [None]
            ours = [None]
            weights_np = None if weights is None else weights.numpy()
            on_device = rows.to(device)
            weights_device = None if weights is None else weights.to(device)

            def run_reference():
                reference[0] = reference_quantize(rows.numpy(), qtype, weights_np)

            def run_ours():
                ours[0] = codec.quantize(on_device, weights_device)

            ggml_seconds = _best_seconds(run_reference, args.repeat, lambda: None)
            run_ours()  # warm-up (CUDA kernels, allocator)
            our_seconds = _best_seconds(run_ours, args.repeat, synchronize)
            identical = np.array_equal(ours[0].cpu().numpy(), reference[0])
            print(f"{name:6} {'yes' if weights is not None else 'no':8} {megabytes / ggml_seconds:10.1f} "
                  f"{megabytes / our_seconds:10.1f} {ggml_seconds / our_seconds:10.2f}  {identical}", flush=True)


if __name__ == "__main__":
    main()
