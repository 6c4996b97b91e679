"""Benchmark: ewq-gguf on the CPU against llama.cpp, in one run, with the load average beside every number.

1. Quantizer throughput per type, MB/s of float32 input, with and without an imatrix: ggml's own encoder on one
   thread (the reference, what llama-quantize runs per thread), our native encoders on one thread and on every CPU;
   every column's bytes are checked against ggml's.
2. End to end, a Hugging Face folder to a uniform Q4_K GGUF on both development models, interleaved round by round:
   `ewq-gguf convert --method uniform --type Q4_K --device cpu` against llama.cpp's two steps
   (`convert_hf_to_gguf.py --outtype bf16`, then `llama-quantize --pure ... Q4_K_S <threads>`); and ewq-gguf's
   default conversion (EWQ, its analysis included) against its uniform Q8_0 conversion of the same model.
   Each route's best wall time over the rounds is compared.

    python -m scripts.bench.cpu [--rows 1024] [--columns 4096] [--types Q4_K,Q6_K] [--rounds 2]
        [--models smollm2,qwen25] [--threads 2] [--skip-quantizers] [--skip-end-to-end] [--results docs/results.md]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ewq_gguf import llamacpp
from ewq_gguf.devenv import DEV_MODEL_NAMES, dev_model
from ewq_gguf.quant import QType, ggml_backend, native_backend
from ewq_gguf.quant.chunking import default_threads
from scripts.check.llama_quantize import compare_files
from scripts.common.llama_tools import run_convert, run_measured
from scripts.common.results_file import cpu_name, shown, update_section


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def _best_seconds(run, repeat: int) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def quantizer_table(rows: int, columns: int, types: list[QType], repeat: int) -> str:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(rows, columns, generator=generator) * 0.02
    importance = torch.exp(torch.randn(columns, generator=generator) * 1.5)
    megabytes = values.numel() * 4 / 1e6
    cpus = default_threads()
    header = ["type", "imatrix", "ggml 1 thr", "native 1 thr", f"native {cpus} thr", "native/ggml per core",
              "same bytes", "load"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print(lines[0], flush=True)
    for qtype in types:
        for weights in (None, importance):
            ggml_s, reference = _best_seconds(lambda: ggml_backend.quantize(values, qtype, weights, threads=1), repeat)
            one_s, one = _best_seconds(lambda: native_backend.quantize(values, qtype, weights, threads=1), repeat)
            all_s, every = _best_seconds(lambda: native_backend.quantize(values, qtype, weights, threads=cpus), repeat)
            same = torch.equal(one, reference) and torch.equal(every, reference)
            cells = [qtype.name, "yes" if weights is not None else "no"]
            cells += [f"{megabytes / seconds:.0f}" for seconds in (ggml_s, one_s, all_s)]
            cells += [f"{ggml_s / one_s:.1f}x", "yes" if same else "NO", _load()]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    notes = [f"{rows}x{columns} float32 input ({megabytes:.0f} MB), N(0, 0.02); MB/s of float32 input, best of "
             f"{repeat}; the native encoders' instruction set: {native_backend.ISAS[0]}. \"load\": the 1-minute load "
             f"average after the row's measurements.",
             "\"same bytes\": both native columns equal ggml_quantize_chunk's output, byte for byte."]
    return "\n".join(notes + [""] + lines)


def _ewq(model_dir: Path, out: Path, *options: str):
    return run_measured([sys.executable, "-m", "ewq_gguf", "convert", model_dir, out, "--device", "cpu", "--quiet",
                         *options])


def end_to_end_table(models: list[str], rounds: int, threads: int) -> str:
    llama_quantize = llamacpp.tool("llama-quantize")
    if llama_quantize is None or llamacpp.converter_script() is None:
        sys.exit("llama.cpp's tools are not built: run vendor/build_llama_tools.sh first")
    routes = ("ewq-gguf uniform Q4_K", "llama.cpp bf16 + Q4_K_S", "ewq-gguf default (EWQ)", "ewq-gguf uniform Q8_0")
    best = {(model, route): float("inf") for model in models for route in routes}
    parity = {}
    print("| round | model | " + " | ".join(f"{route} s" for route in routes) + " | load |", flush=True)
    with tempfile.TemporaryDirectory(dir=".", prefix="bench-cpu-") as work:
        for round_number in range(1, rounds + 1):
            for model in models:
                model_dir = dev_model(model)
                folder = Path(work) / f"{model}-{round_number}"   # each run writes new files (convert never overwrites)
                folder.mkdir()
                ours = _ewq(model_dir, folder / "ewq-Q4_K.gguf", "--method", "uniform", "--type", "Q4_K")
                converted = run_convert(model_dir, folder / "llama-bf16.gguf", "bf16")
                quantized = run_measured([llama_quantize, "--pure", folder / "llama-bf16.gguf",
                                          folder / "llama-Q4_K.gguf", "Q4_K_S", str(threads)])
                default = _ewq(model_dir, folder / "ewq-default.gguf")
                q8 = _ewq(model_dir, folder / "ewq-Q8_0.gguf", "--method", "uniform", "--type", "Q8_0")
                seconds = (ours.wall_s, converted.wall_s + quantized.wall_s, default.wall_s, q8.wall_s)
                for route, value in zip(routes, seconds):
                    best[model, route] = min(best[model, route], value)
                print(f"| {round_number} | {model} | " + " | ".join(f"{value:.1f}" for value in seconds)
                      + f" | {_load()} |", flush=True)
                if model not in parity:
                    parity[model] = compare_files(folder / "ewq-Q4_K.gguf", folder / "llama-Q4_K.gguf")
                shutil.rmtree(folder)
    header = ["model", *(f"{route} s" for route in routes), "Q4_K: ewq-gguf / llama.cpp", "EWQ / uniform Q8_0",
              "Q4_K tensors byte-identical"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        times = [best[model, route] for route in routes]
        match = parity[model]
        lines.append("| " + " | ".join([model, *(f"{value:.1f}" for value in times), f"{times[0] / times[1]:.2f}",
                                        f"{times[2] / times[3]:.2f}",
                                        f"{match.same_bytes} of {match.compared}"]) + " |")
    notes = [f"Best wall time of {rounds} interleaved rounds per route (seconds; each route a fresh process). "
             f"llama.cpp: convert_hf_to_gguf.py --outtype bf16, then llama-quantize --pure Q4_K_S with {threads} "
             f"threads. ewq-gguf: --device cpu, the native encoders ({native_backend.ISAS[0]}). Models: "
             + ", ".join(f"`{shown(dev_model(model))}`" for model in models) + "."]
    return "\n".join(notes + [""] + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--columns", type=int, default=4096, help="a multiple of 256")
    parser.add_argument("--types", help="comma-separated type names (default: every type the native encoders cover)")
    parser.add_argument("--repeat", type=int, default=2, help="quantizer runs per measurement; the best is kept")
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end rounds; each route's best is kept")
    parser.add_argument("--models", default=",".join(DEV_MODEL_NAMES), help="development models, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="llama-quantize's threads")
    parser.add_argument("--skip-quantizers", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--results", type=Path, help="write the tables into this markdown file's sections")
    args = parser.parse_args()
    if not ggml_backend.available() or not native_backend.available():
        sys.exit("both ggml's encoders (llama-cpp-python) and the native ones (pip install -e .) are needed")

    device = f"{cpu_name()}, {default_threads()} CPUs"
    print(f"{device}; load average (1 min) {_load()} at the start", flush=True)
    sections = []
    if not args.skip_quantizers:
        names = args.types.split(",") if args.types else sorted(qtype.name for qtype in native_backend.TYPES)
        table = quantizer_table(args.rows, args.columns, [QType[name.strip().upper()] for name in names],
                                args.repeat)
        command = (f"python -m scripts.bench.cpu --skip-end-to-end --rows {args.rows} --columns {args.columns} "
                   f"--results {shown(args.results or 'docs/results.md')}")
        sections.append((f"Native quantizers against ggml's, per core and on all cores ({device})", table, command))
    if not args.skip_end_to_end:
        models = [name.strip() for name in args.models.split(",")]
        table = end_to_end_table(models, args.rounds, args.threads)
        command = (f"python -m scripts.bench.cpu --skip-quantizers --rounds {args.rounds} --models {args.models} "
                   f"--results {shown(args.results or 'docs/results.md')}")
        sections.append((f"End to end on the CPU: ewq-gguf against llama.cpp ({device})", table, command))
    for title, table, command in sections:
        print(f"\n{title}\n{table}")
        if args.results:
            update_section(args.results, title, table, command=command)
    print(f"load average (1 min) {_load()} at the end")


if __name__ == "__main__":
    main()
