"""Benchmark: how much the block analysis (softmax + histogram entropy, ZD) costs over just reading the tensors.

For each model and device it times (best of --repeat runs, after one warm-up read so the page cache is warm; with
--cold the checkpoint's files are evicted from the page cache before every timed run, so reads come from disk):
  read       every block's 2-D weights loaded from the checkpoint (safetensors -> CPU tensor, layout transform)
  read+copy  the same, then copied to the device (what the analysis must do at least)
  analyse    ewq_gguf.analyse.analyze on that device
and prints the ratio analyse / read. The goal on a GPU is <= 1.2x.

Usage: python -m scripts.bench.analyze MODEL_DIR [MODEL_DIR ...] [--device auto|cpu|cuda|both] [--repeat 3] [--cold]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ewq_gguf.analyse import analyze
from ewq_gguf.analyse.analysis import block_matrices
from ewq_gguf.source.model import SourceModel, open_checkpoint


def evict(model_dir: str) -> None:
    """Drop the checkpoint's files from the page cache (posix_fadvise DONTNEED: no root needed)."""
    for path in Path(model_dir).glob("*.safetensors"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def best_time(run: Callable[[], object], device: torch.device, repeat: int, cold_dir: str | None) -> float:
    times = []
    for _ in range(repeat):
        if cold_dir is not None:
            evict(cold_dir)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def read_all(model: SourceModel, device: torch.device) -> None:
    for specs in block_matrices(model).values():
        for spec in specs:
            model.load(spec).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "both"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each run")
    args = parser.parse_args()
    if args.device == "both":
        devices = [torch.device("cpu"), torch.device("cuda")]
    elif args.device == "auto":
        devices = [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    else:
        devices = [torch.device(args.device)]
    cpu = torch.device("cpu")
    rows = [("model", "device", "cache", "weights", "read s", "read+copy s", "analyse s", "analyse/read", "analyse/read+copy")]
    for model_dir in args.models:
        model = open_checkpoint(model_dir)
        cold = model_dir if args.cold else None
        weights = sum(spec.numel for specs in block_matrices(model).values() for spec in specs)
        read_all(model, cpu)   # warm the page cache
        read = best_time(lambda: read_all(model, cpu), cpu, args.repeat, cold)
        for device in devices:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
            read_copy = best_time(lambda: read_all(model, device), device, args.repeat, cold)
            analysis_time = best_time(lambda: analyze(model, device=device, progress=False), device, args.repeat,
                                      cold)
            rows.append((model.name, name, "cold" if args.cold else "warm", f"{weights / 1e6:.1f}M", f"{read:.2f}", f"{read_copy:.2f}",
                         f"{analysis_time:.2f}", f"{analysis_time / read:.2f}x", f"{analysis_time / read_copy:.2f}x"))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
