"""GPTQ rounding (--rounding gptq) against nearest rounding on the same optimal plan, at llama.cpp's mix sizes.
Writes the "GPTQ rounding: <model>" section of docs/results.md.

    python -m scripts.bench.gptq --calibration CAL.json --eval-text EVAL.txt [--model models/smollm2] [--mixes Q4_K_M]

For each llama.cpp mix (Q4_K_M by default), llama-quantize makes two files from the F32 conversion: without
imatrix, and with the calibration's importance matrix (its .imatrix.gguf, which equals llama-imatrix's on the same
chunks). One optimal plan is made at exactly the size of the file without imatrix (with the calibration's
importance matrix) and written twice: nearest rounding (ggml's, with the importance matrix) and GPTQ rounding (same
types, same importance matrix as the scale search's weights). With --no-imatrix-too, the plan made without
importance matrix is also written with both roundings (GPTQ's scale search then weighs columns by diag(H)). Each
file is scored by KL divergence against the F32 conversion on the evaluation text, which must not overlap the
calibration text. A plot of KLD against file size goes to docs/gptq_<model>.png (needs matplotlib: the plot extra).

Steps are cached in --work (default out/bench-gptq): delete a file there to redo its step.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from scripts.bench.optimal import scored, step
from scripts.common.llama_tools import run_measured
from scripts.common.results_file import shown_arguments, update_section

from ewq_gguf import llamacpp
from ewq_gguf.api import convert
from ewq_gguf.calibrate import Calibration, imatrix_path_for
from ewq_gguf.constants import DEFAULT_GPTQ_TOKENS
from ewq_gguf.devenv import REPOSITORY, dev_model
from ewq_gguf.plan.plan import Plan
from ewq_gguf.validate.compare import plot_size_vs_kld, require_matplotlib

RESULTS = REPOSITORY / "docs" / "results.md"
TITLE = "GPTQ rounding"


def recorded_plan(path: Path) -> Plan:
    import gguf

    from ewq_gguf.constants import KEY_EWQ_PLAN

    field = gguf.GGUFReader(path).fields[KEY_EWQ_PLAN]
    return Plan.from_json(bytes(field.parts[field.data[0]]).decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(dev_model("smollm2")))
    parser.add_argument("--work", default="out/bench-gptq")
    parser.add_argument("--calibration", required=True, help="calibration JSON of --model (ewq-gguf calibrate)")
    parser.add_argument("--eval-text", required=True, help="evaluation text, outside the calibration text")
    parser.add_argument("--base", help="the F32 conversion of --model (default: made in --work)")
    parser.add_argument("--mixes", type=lambda text: text.split(","), default=["Q4_K_M"])
    parser.add_argument("--gptq-tokens", type=int, default=DEFAULT_GPTQ_TOKENS)
    parser.add_argument("--sequential", action="store_true",
                        help="also a GPTQ file whose blocks take the rounded blocks' outputs (--gptq-sequential)")
    parser.add_argument("--no-imatrix-too", action="store_true", help="also the plans without importance matrix")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=20, help="evaluation chunks of --ctx tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quantize_tool = llamacpp.tool("llama-quantize")
    if quantize_tool is None:
        sys.exit("llama-quantize not built: run vendor/build_llama_tools.sh")
    if not args.no_write:
        require_matplotlib()   # before the long part
    calibration = Calibration.load(args.calibration)
    importance = imatrix_path_for(args.calibration)
    base = Path(args.base) if args.base else step(
        work / "base-F32.gguf", lambda out: convert(args.model, out, "uniform", type="F32", progress=False))

    rows = []   # (mix, imatrix, rounding, path)
    for mix in args.mixes:
        peer = step(work / f"llama-{mix}.gguf", lambda out: run_measured([quantize_tool, base, out, mix, "2"]))
        rows.append((mix, "no", "llama.cpp", peer))
        rows.append((mix, "yes", "llama.cpp", step(work / f"llama-{mix}-imatrix.gguf", lambda out: run_measured(
            [quantize_tool, "--imatrix", importance, base, out, mix, "2"]))))
        for with_imatrix in ([True, False] if args.no_imatrix_too else [True]):
            suffix = "imatrix" if with_imatrix else "plain"
            options = {"imatrix": args.calibration} if with_imatrix else {}
            plan_path = work / f"plan-{mix}-{suffix}.json"
            if not plan_path.exists():
                convert(args.model, work / "unused.gguf", "optimal", calibration=calibration,
                        target_size=peer.stat().st_size, dry_run=True, plan_out=plan_path, progress=False, **options)
            for rounding in ("nearest", "gptq", "gptq-sequential") if args.sequential else ("nearest", "gptq"):
                extra = {"calibration": args.calibration, "gptq_tokens": args.gptq_tokens,
                         "gptq_sequential": rounding == "gptq-sequential"} if rounding != "nearest" else {}
                path = step(work / f"ours-{mix}-{suffix}-{rounding}.gguf",
                            lambda out: convert(args.model, out, plan=plan_path, rounding=rounding.partition("-")[0],
                                                progress=False, **options, **extra))
                rows.append((mix, "yes" if with_imatrix else "no", rounding, path))

    measured = scored(base, [row[3] for row in rows], Path(args.eval_text), args, work)
    lines = ["| mix size | imatrix | rounding | bytes | bpw | KLD | +/- | top-1 % | PPL | KLD / nearest's |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for mix, imatrix, rounding, path in rows:
        report = measured[path.name]
        ratio = ""
        if rounding.startswith("gptq"):
            nearest = measured[path.name.replace(f"-{rounding}.", "-nearest.")]
            ratio = f"**{report.kld / nearest.kld:.3f}**"
            plan = recorded_plan(path)
            kept = Counter(entry.rounding_note for entry in plan.entries
                           if entry.rounding != "gptq" and entry.rounding_note != "")
            objective = plan.params.get("gptq_objective", {})
            notes.append(f"{mix} size, imatrix {imatrix}, {rounding}: GPTQ on {sum(e.rounding == 'gptq' for e in plan.entries)} "
                         f"tensors, nearest kept on {sum(kept.values())} "
                         f"({', '.join(f'{count}: {note}' for note, count in kept.items())}); output error tr((W-Q)H(W-Q)^T) summed over the rounded "
                         f"tensors {objective.get('ratio', float('nan')):.3f}x nearest's (median per tensor "
                         f"{objective.get('median_ratio', float('nan')):.3f}x)")
        if rounding == "gptq" and imatrix == "yes":
            peer = measured[f"llama-{mix}-imatrix.gguf"]
            notes.append(f"{mix} size: ours (optimal plan, gptq) {report.kld / peer.kld:.3f}x the KLD of llama.cpp's "
                         f"{mix} with the same imatrix, {report.bytes / peer.bytes:.3f}x its bytes")
        lines.append(f"| {mix} | {imatrix} | {rounding} | {report.bytes:,} | {report.bpw:.3f} | {report.kld:.5f} | "
                     f"{report.kld_se:.5f} | {100 * report.top1:.2f} | {report.ppl:.3f} | {ratio} |")
    model_name = Path(args.model).name
    plot = None if args.no_write else plot_size_vs_kld(list(measured.values()), RESULTS.parent / f"gptq_{model_name}.png")
    body = "\n".join([
        f"Model {model_name}; calibration: {calibration.tokens} tokens of {Path(calibration.text).name} "
        f"({calibration.sensitivity_method} sensitivities), GPTQ inputs from its first {args.gptq_tokens} tokens; "
        f"evaluation: {args.chunks} x {args.ctx} tokens of {Path(args.eval_text).name} (not in the calibration "
        "text); KLD against the F32 conversion. Ours: one `--method optimal --target-size <llama.cpp file's bytes>` "
        "plan per mix, written with `--rounding nearest` and `--rounding gptq` (same types, so the same tensor data; "
        "the files differ in size only by the plan their metadata records); *gptq-sequential* adds "
        "`--gptq-sequential` (each block's inputs through the rounded blocks before it). Both roundings use the "
        "calibration's importance matrix (`--imatrix`); so does llama.cpp's file with imatrix "
        "(`llama-quantize --imatrix`). Wall times are not given here (scripts/gpu/calibrate.sh gptq8b and the "
        "closing notes time the rounding).",
        "",
        *lines,
        "",
        *[f"- {note}" for note in notes],
        *([] if plot is None else ["", f"![KLD against file size]({plot.name})"]),
    ])
    print(body)
    if not args.no_write:
        title = f"{TITLE}: {model_name}" + ("" if args.gptq_tokens == DEFAULT_GPTQ_TOKENS else
                                             f", {args.gptq_tokens} GPTQ tokens")
        update_section(RESULTS, title, body,
                       "python -m scripts.bench.gptq " + shown_arguments(sys.argv[1:]))


if __name__ == "__main__":
    main()
