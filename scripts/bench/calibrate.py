"""`ewq-gguf calibrate` against `llama-imatrix`: wall time and peak memory on the same tokens and threads, one run.

    python -m scripts.bench.calibrate [--model models/qwen25] [--tokens 32768] [--threads 2] [--repeats 1]

Both tools read the first half of Debian's reference manual (as scripts/bench/optimal.py calibrates) in chunks of
--ctx tokens, as many chunks as --tokens asks. llama-imatrix runs on the BF16 GGUF of the model (the stored precision,
as its users run it) with its defaults (perplexity included); ours runs with its defaults, and its pass also yields
LIM, the sensitivities and the quantization error tables. Each tool runs in its own process, the two interleaved,
fastest of --repeats; the load average is printed beside the result (run it on an otherwise idle machine).
Writes the section "Calibration time: <model>" of docs/results.md unless --no-write.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

from ewq_gguf import llamacpp
from ewq_gguf.api import convert
from ewq_gguf.constants import DEFAULT_CALIBRATION_CTX, DEFAULT_CALIBRATION_TOKENS
from ewq_gguf.devenv import dev_model
from ewq_gguf.text import DEBIAN_REFERENCE
from scripts.common.llama_tools import MeasuredRun, run_measured
from scripts.common.results_file import cpu_name, shown, shown_arguments, update_section



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=dev_model("qwen25"))
    parser.add_argument("--work", type=Path, default=Path("out/bench-calibrate"))
    parser.add_argument("--tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS)
    parser.add_argument("--ctx", type=int, default=DEFAULT_CALIBRATION_CTX)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    imatrix_tool = llamacpp.tool("llama-imatrix")
    if imatrix_tool is None:
        sys.exit("llama-imatrix is not built: bash vendor/build_llama_tools.sh")
    work = args.work / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calib.txt"
    if not text.exists():
        content = gzip.decompress(DEBIAN_REFERENCE.read_bytes()).decode("utf-8")
        text.write_text(content[: len(content) // 2])
    base = work / "model-BF16.gguf"
    if not base.exists():
        convert(args.model, base, "uniform", type="BF16", progress=False)
    n_chunks = args.tokens // args.ctx
    ours_json = work / "calib.json"
    commands = {
        "llama-imatrix": [imatrix_tool, "-m", base, "-f", text, "-c", args.ctx, "--chunks", n_chunks,
                          "-t", args.threads, "-o", work / "llama.imatrix.gguf"],
        "ewq-gguf calibrate": [sys.executable, "-m", "ewq_gguf", "calibrate", args.model, "--text", text,
                               "--tokens", args.tokens, "--ctx", args.ctx, "--threads", args.threads, "--device",
                               "cpu", "--out", ours_json, "--force", "--quiet"],
    }
    best: dict[str, MeasuredRun] = {}
    phases: dict[str, float] = {}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        for tool, command in commands.items():
            run = run_measured(command)
            print(f"{tool}: {run.wall_s:.1f} s, peak RSS {run.peak_rss_mib:.0f} MiB", flush=True)
            if tool not in best or run.wall_s < best[tool].wall_s:
                best[tool] = run
                if tool == "ewq-gguf calibrate":
                    phases = json.loads(ours_json.read_text())["seconds"]
    load_after = os.getloadavg()
    reference = best["llama-imatrix"]
    rows = ["| tool | wall s | x llama-imatrix | peak RSS MiB | yields |", "|---|---|---|---|---|"]
    for tool, run in best.items():
        yields = ("importance vectors" if tool == "llama-imatrix"
                  else "importance vectors, LIM, Fisher sensitivities, error tables")
        rows.append(f"| {tool} | {run.wall_s:.1f} | {run.wall_s / reference.wall_s:.2f} | {run.peak_rss_mib:.0f} | "
                    f"{yields} |")
    phase_line = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    body = "\n".join(rows) + (
        f"\n\nModel {shown(args.model)}; {n_chunks} chunks x {args.ctx} tokens of the first half of Debian's "
        f"reference manual; {args.threads} threads; llama-imatrix on the BF16 GGUF with its defaults; fastest of "
        f"{args.repeats}, interleaved. Ours by phase: {phase_line}. {cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"load average {load_before[0]:.2f} before and {load_after[0]:.2f} after.")
    print(body)
    if not args.no_write:
        update_section(args.results, f"Calibration time: {args.model.name}", body,
                       "python -m scripts.bench.calibrate " + shown_arguments(sys.argv[1:]))


if __name__ == "__main__":
    main()
