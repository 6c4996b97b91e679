"""docs/results.md table for the entropy-driven methods: size, bpw, PPL, KLD vs bf16 and top-1 agreement.

Files: bf16 (the base), uniform Q8_0 and Q4_K, llama.cpp's Q4_K_M (llama-quantize from the vendor/ tools, made from
our bf16 file, when built), EWQ default, EWQ with k in {0.3, 1.0}, FastEWQ, ZD at fractions 0.25 and 0.5 in both
orderings. The analysis is computed once and reused by every EWQ/ZD plan.

    python -m scripts.bench.ewq [MODEL_DIR] [--chunks 8] [--text FILE] [--results docs/results.md]
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import ewq_gguf
from ewq_gguf import llamacpp
from ewq_gguf.devenv import dev_model
from scripts.common.results_file import shown, update_section

VARIANTS = [  # label, convert options
    ("uniform Q8_0", dict(method="uniform", type="Q8_0")),
    ("uniform Q4_K", dict(method="uniform", type="Q4_K")),
    ("EWQ default (k 0.65)", dict(method="ewq")),
    ("EWQ k 0.3", dict(method="ewq", k=0.3)),
    ("EWQ k 1.0", dict(method="ewq", k=1.0)),
    ("FastEWQ", dict(method="fastewq")),
    ("ZD 0.25, highest ZD low (default)", dict(method="zd", fraction=0.25, direction="high-first")),
    ("ZD 0.25, lowest ZD low", dict(method="zd", fraction=0.25, direction="low-first")),
    ("ZD 0.5, highest ZD low (default)", dict(method="zd", fraction=0.5, direction="high-first")),
    ("ZD 0.5, lowest ZD low", dict(method="zd", fraction=0.5, direction="low-first")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=dev_model("smollm2"), help="default: %(default)s")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        base = ewq_gguf.convert(args.model_dir, work / "bf16.gguf", "uniform", type="BF16", progress=False).path
        analysis = work / "analysis.json"
        ewq_gguf.analyze(args.model_dir, progress=False).save(analysis)
        labels, files = [], []
        quantize = llamacpp.tool("llama-quantize")
        if quantize is not None:
            subprocess.run([str(quantize), str(base), str(work / "q4_k_m.gguf"), "Q4_K_M", "2"], check=True,
                           capture_output=True)
            labels.append("llama.cpp Q4_K_M (llama-quantize)")
            files.append(work / "q4_k_m.gguf")
        for number, (label, options) in enumerate(VARIANTS):
            if options["method"] in ("ewq", "zd"):
                options = {**options, "analysis": analysis}
            out = work / f"variant{number}.gguf"
            ewq_gguf.convert(args.model_dir, out, progress=False, **options)
            labels.append(label)
            files.append(out)
        reports = ewq_gguf.compare(base, files, text=args.text, chunks=args.chunks, progress=False)
    lines = [f"Model `{shown(args.model_dir)}`; {reports[0].chunks} chunks x {reports[0].ctx} tokens of "
             f"{shown(reports[0].text)}; "
             "KLD and top-1 against the bf16 file, computed through llama.cpp.", "",
             "| file | MB | bpw | PPL | KLD | top-1 % |", "|---|---|---|---|---|---|"]
    for label, report in zip(["bf16 (base)", *labels], reports):
        lines.append(f"| {label} | {report.bytes / 1e6:.1f} | {report.bpw:.3f} | {report.ppl:.4f} | "
                     f"{report.kld:.5f} | {100 * report.top1:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        update_section(args.results, f"Entropy-driven plans ({Path(args.model_dir).name})", table,
                       command=f"python -m scripts.bench.ewq {shown(args.model_dir)} --chunks {args.chunks} "
                               f"--results {shown(args.results)}")


if __name__ == "__main__":
    main()
