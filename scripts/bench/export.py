"""Benchmark: ewq_gguf.export() of a model in memory vs model.save_pretrained() + ewq_gguf.convert() of the folder.

Each way runs in its own process that loads the model with transformers (bf16, on --device), then writes the same
GGUF; the ways alternate for --repeats rounds and each way's fastest run is shown (a busy machine only adds time).
Wall time and peak RSS are measured per process (wait4), the time inside it is split into loading the model,
saving the folder (save_pretrained path only) and converting, and the conversion's busy time into read, quantize
and write (ConvertResult.stage_seconds; reading and quantizing overlap writing). Both files must be byte-identical.

    python -m scripts.bench.export [MODEL_DIR] [--device cpu|cuda] [--type Q8_0 | --method ewq] [--repeats 3]
                                   [--results FILE]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ewq_gguf.devenv import dev_model
from scripts.common.llama_tools import run_measured
from scripts.common.results_file import shown, update_section

WAYS = ("export", "save-convert")
RESULT_MARK = "BENCH_EXPORT_RESULT "


def child(way: str, model_dir: Path, out: Path, device: str, options: dict) -> None:
    """Load the model, write `out` one way, print the phase times as one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ewq_gguf

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    phases = {"load": time.perf_counter() - started}
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if way == "export":
        result = ewq_gguf.export(model, tokenizer, out, device=device, progress=False, **options)
        phases["convert"] = result.seconds
    else:
        started = time.perf_counter()
        folder = out.parent / model_dir.name   # named as the model, so that general.name is the same
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        phases["save"] = time.perf_counter() - started
        result = ewq_gguf.convert(folder, out, device=device, progress=False, **options)
        phases["convert"] = result.seconds
        shutil.rmtree(folder)
    print(RESULT_MARK + json.dumps({"phases": phases, "stages": result.stage_seconds,
                                    "rss_after_load_mib": rss_after_load, "bytes": result.bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=dev_model("smollm2"), type=Path, help="default: %(default)s")
    parser.add_argument("--device", default="cpu", help="where the model lives and is quantized: cpu, cuda, cuda:1")
    parser.add_argument("--method", default="uniform")
    parser.add_argument("--type", default="Q8_0", help="for --method uniform")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both ways; the fastest run of each is shown")
    parser.add_argument("--results", type=Path, help="write the table into this markdown file's section")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = {"method": args.method, **({"type": args.type} if args.method == "uniform" else {})}
    if args.child:
        child(args.child, args.model_dir, args.out, args.device, options)
        return

    runs: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(dir=".") as work:
        for round_number in range(args.repeats):
            for way in WAYS if round_number % 2 == 0 else WAYS[::-1]:
                out = Path(work) / f"{way}-{round_number}" / "out.gguf"
                out.parent.mkdir()
                measured = run_measured([sys.executable, "-m", "scripts.bench.export", args.model_dir, "--device",
                                         args.device, "--method", args.method, "--type", args.type, "--child", way,
                                         "--out", out])
                line = next(line for line in measured.output.splitlines() if line.startswith(RESULT_MARK))
                if way not in runs or measured.wall_s < runs[way][0].wall_s:
                    runs[way] = (measured, json.loads(line[len(RESULT_MARK):]), out.read_bytes())
                out.unlink()
        identical = runs["export"][2] == runs["save-convert"][2]

    label = args.type if args.method == "uniform" else args.method
    lines = [f"Model: `{shown(args.model_dir)}` loaded in bf16 on `{args.device}`, written as {label} "
             f"({runs['export'][1]['bytes'] / 1e6:.1f} MB); each way in its own process, fastest of {args.repeats}. "
             f"Files byte-identical: {'yes' if identical else 'NO'}.", "",
             "| way | process wall s | peak RSS MiB | RSS after load MiB | load s | save_pretrained s | convert s "
             "| read s | quantize s | write s | verify s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for way, (measured, result, _) in runs.items():
        phases, stages = result["phases"], result["stages"]
        save = f"{phases['save']:.2f}" if "save" in phases else "-"
        lines.append(f"| {way} | {measured.wall_s:.2f} | {measured.peak_rss_mib:.0f} | "
                     f"{result['rss_after_load_mib']:.0f} | {phases['load']:.2f} | {save} | {phases['convert']:.2f} | "
                     f"{stages.get('read', 0):.2f} | {stages.get('quantize', 0):.2f} | {stages.get('write', 0):.2f} | "
                     f"{stages.get('verify', 0):.2f} |")
    export, saved = runs["export"], runs["save-convert"]
    lines += ["", f"export / (save_pretrained + convert), time after loading: "
                  f"{export[1]['phases']['convert'] / (saved[1]['phases']['save'] + saved[1]['phases']['convert']):.2f}"
                  f"; peak RSS: {export[0].peak_rss_mib / saved[0].peak_rss_mib:.2f}. read/quantize/write are busy "
                  "seconds of the writer's threads (reading and quantizing the next tensor overlap writing this one); "
                  "verify re-reads the written file before it is put in place."]
    table = "\n".join(lines)
    print(table)
    if args.results:
        update_section(args.results, f"Export from memory vs save_pretrained + convert ({args.device}, {label})",
                       table, command=f"python -m scripts.bench.export {shown(args.model_dir)} --device {args.device} "
                                      f"--method {args.method} --type {args.type} --repeats {args.repeats} "
                                      f"--results {shown(args.results)}")


if __name__ == "__main__":
    main()
