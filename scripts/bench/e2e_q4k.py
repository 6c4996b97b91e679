"""Benchmark: a Hugging Face folder to a Q4_K GGUF, ewq-gguf against llama.cpp's two-step route, in one run.

ewq-gguf: `python -m ewq_gguf convert DIR OUT --method uniform --type Q4_K --device cpu` (one process).
llama.cpp: `convert_hf_to_gguf.py DIR --outtype bf16` (exact for bf16 checkpoints), then
`llama-quantize --pure IN OUT Q4_K_S 2` (2 threads). Prints both wall times, their ratio, and how many tensors the
two files store in the same type and the same bytes. Extra arguments for ewq-gguf pass through --convert-arg.

    python -m scripts.bench.e2e_q4k [MODEL_DIR] [--outtype bf16] [--threads 2] [--convert-arg=--quantizer=ggml]
        [--results docs/results.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ewq_gguf import llamacpp
from ewq_gguf.devenv import dev_model
from scripts.check.llama_quantize import compare_files
from scripts.common.llama_tools import run_convert, run_measured
from scripts.common.results_file import shown, update_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default=dev_model("smollm2"), help="default: %(default)s")
    parser.add_argument("--outtype", default="bf16", choices=["bf16", "f32"], help="convert_hf_to_gguf.py's output")
    parser.add_argument("--threads", type=int, default=2, help="llama-quantize's threads")
    parser.add_argument("--convert-arg", action="append", default=[],
                        help="extra argument for ewq-gguf convert (repeat it), e.g. --convert-arg=--quantizer=ggml")
    parser.add_argument("--results", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    llama_quantize = llamacpp.tool("llama-quantize")
    if llama_quantize is None or llamacpp.converter_script() is None:
        sys.exit("llama.cpp's tools are not built: run vendor/build_llama_tools.sh first")
    model_dir = Path(args.model_dir)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=".", prefix="bench-e2e-") as work:
        ours_path = Path(work) / "ewq-Q4_K.gguf"
        intermediate, theirs_path = Path(work) / f"llama-{args.outtype}.gguf", Path(work) / "llama-Q4_K.gguf"
        ours = run_measured([sys.executable, "-m", "ewq_gguf", "convert", model_dir, ours_path, "--method",
                             "uniform", "--type", "Q4_K", "--device", "cpu", "--quiet", *args.convert_arg])
        converted = run_convert(model_dir, intermediate, args.outtype)
        quantized = run_measured([llama_quantize, "--pure", intermediate, theirs_path, "Q4_K_S", str(args.threads)])
        parity = compare_files(ours_path, theirs_path)
    load_after = os.getloadavg()[0]

    theirs_s = converted.wall_s + quantized.wall_s
    extra = "".join(f" {arg}" for arg in args.convert_arg)
    lines = [
        f"Model: `{shown(model_dir)}`; {os.cpu_count()} CPUs; load average (1 min) {load_before:.2f} before, "
        f"{load_after:.2f} after.", "",
        "| route | wall s | peak RSS MiB |", "|---|---|---|",
        f"| ewq-gguf convert --method uniform --type Q4_K --device cpu{extra} | {ours.wall_s:.1f} | "
        f"{ours.peak_rss_mib:.0f} |",
        f"| convert_hf_to_gguf.py --outtype {args.outtype} | {converted.wall_s:.1f} | {converted.peak_rss_mib:.0f} |",
        f"| llama-quantize --pure Q4_K_S {args.threads} | {quantized.wall_s:.1f} | {quantized.peak_rss_mib:.0f} |",
        f"| llama.cpp total | {theirs_s:.1f} | |", "",
        f"Wall-time ratio ewq-gguf / llama.cpp: {ours.wall_s / theirs_s:.2f}. Tensors: {parity.compared} in both "
        f"files, {parity.same_type} in the same type, {parity.same_bytes} of those byte-identical.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.results:
        passed = "".join(f" --convert-arg={arg}" for arg in args.convert_arg)
        title = f"End-to-end Q4_K: ewq-gguf vs convert_hf_to_gguf.py + llama-quantize ({model_dir.resolve().name})"
        command = f"python -m scripts.bench.e2e_q4k {shown(model_dir)}{passed} --results {shown(args.results)}"
        update_section(args.results, title, table, command=command)


if __name__ == "__main__":
    main()
