"""Throughput of our torch encoders for the 32-block types and IQ4 against ggml_quantize_chunk (one thread).

Prints MB/s of float32 input for a rows x columns Gaussian tensor (default 4096 x 4096), with and without an
importance vector, and whether the bytes are identical. ggml's reference runs single-threaded through ctypes;
ours runs on the CPU with each given torch thread count, and on CUDA when --cuda is given and a GPU is present.
Best of --repeat runs after a warm-up.

    python scripts/bench_quant_legacy_iq4.py [--rows 4096] [--cols 4096] [--threads 1,2] [--repeat 3] [--cuda]
"""
from __future__ import annotations

import time

import click
import numpy as np
import torch

from ewq_gguf.quant import CODECS, QType
from ewq_gguf.quant.ggml_reference import reference_quantize

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS")


def _best_seconds(run, repeat: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _timed_encoder(codec, rows: torch.Tensor, importance):
    def run():
        result = codec.quantize(rows, importance)
        if rows.is_cuda:
            torch.cuda.synchronize()
        return result

    return run


@click.command()
@click.option("--rows", default=4096)
@click.option("--cols", default=4096)
@click.option("--threads", default="1,2", help="torch CPU thread counts to measure, comma-separated")
@click.option("--repeat", default=3)
@click.option("--types", "type_names", default=",".join(TYPES))
@click.option("--cuda", is_flag=True, help="also time the encoders on the GPU")
def main(rows: int, cols: int, threads: str, repeat: int, type_names: str, cuda: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(rows, cols, generator=generator) * 0.02
    importance = torch.exp(torch.randn(cols, generator=generator))
    megabytes = values.numel() * 4 / 1e6
    thread_counts = [int(t) for t in threads.split(",")]
    use_cuda = cuda and torch.cuda.is_available()
    columns = [f"ours CPU {t} thr" for t in thread_counts] + (["ours CUDA"] if use_cuda else [])

    device_name = torch.cuda.get_device_name() if use_cuda else "no GPU"
    print(f"{rows} x {cols} float32 ({megabytes:.0f} MB), MB/s of input; torch {torch.__version__}; {device_name}")
    print("| type | imatrix | ggml 1 thr | " + " | ".join(columns) + " | bytes equal |")
    print("|---|---|---|" + "---|" * len(columns) + "---|")
    for name in type_names.split(","):
        qtype = QType[name]
        codec = CODECS[qtype]
        for weighted in (False, True):
            if weighted and not codec.uses_importance:
                continue
            ggml_importance = importance.numpy() if weighted else None
            expected = reference_quantize(values.numpy(), qtype, ggml_importance)
            ggml_seconds = _best_seconds(lambda: reference_quantize(values.numpy(), qtype, ggml_importance), repeat)
            speeds, equal = [], True
            for count in thread_counts:
                torch.set_num_threads(count)
                run = _timed_encoder(codec, values, importance if weighted else None)
                speeds.append(megabytes / _best_seconds(run, repeat))
                equal &= np.array_equal(run().numpy(), expected)
            if use_cuda:
                run = _timed_encoder(codec, values.cuda(), importance.cuda() if weighted else None)
                speeds.append(megabytes / _best_seconds(run, repeat))
                equal &= np.array_equal(run().cpu().numpy(), expected)
            cells = " | ".join(f"{speed:.0f}" for speed in speeds)
            print(f"| {name} | {'yes' if weighted else 'no'} | {megabytes / ggml_seconds:.0f} | {cells} | {equal} |",
                  flush=True)


if __name__ == "__main__":
    main()
