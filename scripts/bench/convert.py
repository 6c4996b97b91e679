"""Benchmark: convert a checkpoint to BF16 with ewq-gguf and with llama.cpp's convert_hf_to_gguf.py.

Prints wall time and peak RSS of both conversions (each in its own process, measured the same way) and the
llama-perplexity-method PPL of both files on the same token ids of real text (they must agree within 0.1%).
llama.cpp's side needs vendor/build_llama_tools.sh to have run; without it only ours is measured.

    python -m scripts.bench.convert [MODEL_DIR] [--chunks 8] [--ctx 512] [--results docs/results.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ewq_gguf import llamacpp
from ewq_gguf.devenv import dev_model
from ewq_gguf.validate import compare
from scripts.common.llama_tools import run_convert, run_measured
from scripts.common.results_file import shown, update_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=dev_model("smollm2"), help="default: %(default)s")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--results", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    model_dir = Path(args.model_dir)

    with tempfile.TemporaryDirectory(dir=".") as work:
        ours_path, theirs_path = Path(work) / "ours-bf16.gguf", Path(work) / "llama-cpp-bf16.gguf"
        ours = run_measured([sys.executable, "-m", "ewq_gguf", "convert", model_dir, ours_path,
                             "--method", "uniform", "--type", "BF16", "--quiet"])
        rows = [("ewq-gguf convert --type BF16", ours, ours_path)]
        if llamacpp.converter_script() is not None:
            rows.append(("llama.cpp convert_hf_to_gguf.py --outtype bf16",
                         run_convert(model_dir, theirs_path, "bf16"), theirs_path))
        files = [path for _, _, path in rows]
        reports = compare(files[0], files[1:] or files[:1], ctx=args.ctx, chunks=args.chunks, progress=False)

        lines = [f"Model: `{shown(model_dir)}`; PPL on {reports[0].tokens} scored tokens of {shown(reports[0].text)} "
                 f"(ctx {args.ctx}, the same token ids for both files).", "",
                 "| converter | wall s | peak RSS MiB | file MB | PPL | KLD vs ours |", "|---|---|---|---|---|---|"]
        for (label, run, path), report in zip(rows, reports):
            lines.append(f"| {label} | {run.wall_s:.1f} | {run.peak_rss_mib:.0f} | {path.stat().st_size / 1e6:.1f} | "
                         f"{report.ppl:.4f} | {report.kld:.2e} |")
        if len(rows) == 2:
            ratio = rows[0][1].wall_s / rows[1][1].wall_s
            gap = abs(reports[1].ppl / reports[0].ppl - 1)
            lines += ["", f"Wall-time ratio ours/llama.cpp: {ratio:.2f} (goal <= 0.5); PPL difference {gap:.4%} "
                          "(must be < 0.1%)."]
        table = "\n".join(lines)
    print(table)
    if args.results:
        update_section(args.results, "Conversion to BF16: ewq-gguf vs convert_hf_to_gguf.py", table,
                       command=f"python -m scripts.bench.convert {shown(model_dir)} --results {shown(args.results)}")


if __name__ == "__main__":
    main()
