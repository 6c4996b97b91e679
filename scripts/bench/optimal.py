"""Optimal plans (linearity theorem) against llama.cpp's Q4_K_M and Q3_K_M at the same file size, and the check of
the linear prediction itself. Writes the "Optimal plans vs llama-quantize: <model>" section of docs/results.md.

    python -m scripts.bench.optimal [--model models/smollm2] [--chunks 40] [--threads 1]
    python -m scripts.bench.optimal --model models/qwen25 --work out/bench-optimal-qwen25 ...

The default model is the development model smollm2 (ewq_gguf.devenv: models/smollm2, or under EWQ_DEV_MODELS).

At each peer size the optimal plan is made twice: with the default candidates (every type we encode, MXFP4 for
expert tensors only), and with llama.cpp's k-quant ladder only (KQUANT_CANDIDATES), where a tensor whose rows a
k-quant cannot hold gets llama.cpp's fallback type, as llama-quantize does. The difference is what the 32-block
and IQ4 candidate types are worth.

Texts: the calibration text is the first half of the Debian reference (found on this machine, never shipped); the
evaluation text its last quarter, so no token is both calibrated and scored. Each tool computes its own importance
matrix on the calibration text, the same number of tokens (llama-imatrix for llama-quantize, `ewq-gguf calibrate`
for ours). Every file is scored by KL divergence against the F32 conversion on the evaluation text.

Steps are cached in --work (default out/bench-optimal): delete a file there to redo its step.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ewq_gguf import llamacpp
from ewq_gguf.api import convert
from ewq_gguf.calibrate import Calibration, calibrate
from ewq_gguf.devenv import REPOSITORY, dev_model
from ewq_gguf.text import DEBIAN_REFERENCE
from ewq_gguf.calibrate.imatrix import ImportanceMatrix
from ewq_gguf.constants import DEFAULT_CALIBRATION_TOKENS
from ewq_gguf.plan.optimal import DEFAULT_METRIC, METRICS, predicted_kld
from ewq_gguf.plan.plan import Plan
from ewq_gguf.plan.reuse import plan_from_file
from ewq_gguf.source.model import open_checkpoint
from ewq_gguf.validate import CompareReport, compare
from scripts.common.llama_tools import run_measured
from scripts.common.results_file import shown_arguments, update_section

PEER_MIXES = ("Q4_K_M", "Q3_K_M")
# llama.cpp's k-quant ladder plus Q8_0 and F16: the candidate set without the 32-block and IQ4 types
KQUANT_CANDIDATES = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,F16"
EXTRA_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS")
CANDIDATE_SETS = {"all": None, "k-quants": KQUANT_CANDIDATES}   # label -> --types (None: the default candidates)
DEFAULT_CHUNKS = 40
LINEARITY_BPW = "4.25,4.75,5.25,6.0,7.0"
LINEARITY_UNIFORM = "Q4_0,Q4_1,Q5_0,Q8_0"
SMALL_ERROR = 0.1      # predicted KLD below which the linear regime is summarised
RESULTS = REPOSITORY / "docs" / "results.md"
TITLE = "Optimal plans vs llama-quantize"


@dataclass(frozen=True)
class Row:
    label: str
    path: Path
    side: str                   # "llama.cpp" or "ours"
    imatrix: bool
    variant: str | None         # the calibration error table its prediction uses; None: no prediction
    candidates: str = ""        # optimal plans: a CANDIDATE_SETS label
    mix: str = ""               # files at a peer's size: that PEER_MIXES entry
    unit: bool = False          # quantized with --imatrix unit (no calibration data in the quantization)

    @property
    def imatrix_label(self) -> str:
        return "unit" if self.unit else "yes" if self.imatrix else "no"


def split_text(work: Path) -> tuple[Path, Path]:
    """First half -> calibration text, last quarter -> evaluation text."""
    calib, evaluation = work / "calib.txt", work / "eval.txt"
    if not calib.exists():
        text = gzip.decompress(DEBIAN_REFERENCE.read_bytes()).decode("utf-8")
        calib.write_text(text[: len(text) // 2])
        evaluation.write_text(text[3 * len(text) // 4:])
    return calib, evaluation


def step(path: Path, make, partial: bool = True) -> Path:
    """Run make(output) unless path exists. With partial, make writes to a partial name, renamed to path once
    complete, so an interrupted step (llama-imatrix saves its file every 10 chunks) is never taken for a cached one;
    without, make writes path itself, last."""
    if not path.exists():
        started = time.perf_counter()
        output = path.with_name(f"partial-{path.name}") if partial else path
        make(output)
        output.replace(path)
        print(f"made {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(dev_model("smollm2")))
    parser.add_argument("--work", default="out/bench-optimal")
    parser.add_argument("--tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS, help="calibration tokens for both tools")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="evaluation chunks of --ctx tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU runs faster on fewer)")
    parser.add_argument("--bpw", type=lambda text: [float(value) for value in text.split(",")],
                        default=LINEARITY_BPW, help="bits per weight of the extra optimal plans of the linearity check")
    parser.add_argument("--uniform", type=lambda text: text.split(","), default=LINEARITY_UNIFORM,
                        help="uniform files of the linearity check")
    parser.add_argument("--unit-importance", action="store_true",
                        help="also plan and quantize the files at the peers' sizes with --imatrix unit (ggml's "
                             "error-minimizing search, no calibration data), next to the rows without imatrix")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quantize_tool, imatrix_tool = llamacpp.tool("llama-quantize"), llamacpp.tool("llama-imatrix")
    if quantize_tool is None or imatrix_tool is None:
        sys.exit("llama-quantize / llama-imatrix not built: run vendor/build_llama_tools.sh")
    calib_text, eval_text = split_text(work)
    n_chunks = args.tokens // args.ctx

    base = step(work / "base-F32.gguf", lambda out: convert(args.model, out, "uniform", type="F32", progress=False))
    llama_imatrix = step(work / "llama.imatrix.gguf", lambda out: run_measured(
        [imatrix_tool, "-m", base, "-f", calib_text, "-c", args.ctx, "--chunks", n_chunks, "-o", out, "--no-ppl",
         "-t", args.threads]))
    calibration_path = work / "calib.json"
    timing_path = work / "calib-timing.json"

    def run_calibration(out: Path) -> None:
        started = time.perf_counter()
        calibration = calibrate(args.model, calib_text, tokens=args.tokens, ctx=args.ctx, device="cpu",
                                threads=args.threads, progress=False)
        wall = time.perf_counter() - started
        calibration.save(out)
        load = Path("/proc/loadavg").read_text().split()[:3]
        timing_path.write_text(json.dumps({"wall": wall, "phases": calibration.seconds, "loadavg_after": load}))

    # Calibration.save writes the JSON last and names its sibling importance matrix inside it: no partial name
    step(calibration_path, run_calibration, partial=False)
    calibration = Calibration.load(calibration_path)
    model = open_checkpoint(args.model)

    rows = []
    for mix in PEER_MIXES:
        for with_imatrix in (False, True):
            suffix = "-imatrix" if with_imatrix else ""
            peer = work / f"llama-{mix}{suffix}.gguf"
            extra = ["--imatrix", llama_imatrix] if with_imatrix else []
            step(peer, lambda out: run_measured([quantize_tool, *extra, base, out, mix, "2"]))
            # llama.cpp's imatrix is not ours: its files' errors are not in our tables
            rows.append(Row(f"llama.cpp {mix}", peer, "llama.cpp", with_imatrix, None if with_imatrix else "plain",
                            mix=mix))
            options = {"imatrix": calibration_path} if with_imatrix else {}
            for candidates, types in CANDIDATE_SETS.items():
                ours = work / f"ours-optimal-{mix}-size{'' if types is None else '-kquants'}{suffix}.gguf"
                step(ours, lambda out: convert(args.model, out, "optimal", calibration=calibration, types=types,
                                               target_size=peer.stat().st_size, progress=False, **options))
                rows.append(Row(f"ours optimal @ {mix} size, {candidates}", ours, "ours", with_imatrix,
                                "imatrix" if with_imatrix else "plain", candidates, mix))
            if args.unit_importance and not with_imatrix:
                ours = work / f"ours-optimal-{mix}-size-unit.gguf"
                step(ours, lambda out: convert(args.model, out, "optimal", calibration=calibration, imatrix="unit",
                                               target_size=peer.stat().st_size, progress=False))
                rows.append(Row(f"ours optimal @ {mix} size, all", ours, "ours", False, None, "all", mix, unit=True))
    for bpw in args.bpw:
        path = work / f"ours-optimal-{bpw}bpw.gguf"
        step(path, lambda out: convert(args.model, out, "optimal", calibration=calibration, target_bpw=bpw,
                                       progress=False))
        rows.append(Row(f"ours optimal {bpw} bpw", path, "ours", False, "plain", "all"))
    for qtype in args.uniform:
        path = work / f"ours-uniform-{qtype}.gguf"
        step(path, lambda out: convert(args.model, out, "uniform", type=qtype, progress=False))
        rows.append(Row(f"ours uniform {qtype}", path, "ours", False, "plain"))

    measured = scored(base, [row.path for row in rows], eval_text, args, work)
    # each file's types, read once (reading a GGUF's large vocabulary takes seconds)
    plans = [plan_from_file(model, row.path) for row in rows]
    predictions = {metric: [None if row.variant is None else predicted_kld(plan, calibration, row.variant, metric)
                            for row, plan in zip(rows, plans)] for metric in METRICS}
    agreement = imatrix_agreement(calibration.imatrix, ImportanceMatrix.load(llama_imatrix))
    print_and_write(args, rows, measured, predictions, json.loads(timing_path.read_text()), agreement,
                    type_counts(rows, plans))


def type_counts(rows: list[Row], plans: list[Plan]) -> str:
    """Per peer-size file: how many of its matrices are stored in a 32-block or IQ4 type, by type."""
    parts = []
    n_matrices = None
    for row, plan in zip(rows, plans):
        if row.mix:
            stored = Counter(entry.type.name for entry in plan.entries if len(entry.shape) > 1)
            n_matrices = sum(stored.values())
            extra = {name: stored[name] for name in EXTRA_TYPES if stored[name]}
            by_type = ", ".join(f"{name} {count}" for name, count in extra.items())
            parts.append(f"{row.label}{' +imatrix' if row.imatrix else ' unit' if row.unit else ''}: "
                         f"**{sum(extra.values())}**"
                         + (f" ({by_type})" if by_type else ""))
    return f"of {n_matrices} matrices, " + "; ".join(parts)


def imatrix_agreement(ours: ImportanceMatrix, theirs: ImportanceMatrix) -> str:
    """How close our importance vectors are to llama-imatrix's on the same text: per shared weight, the
    correlation of the two vectors and the ratio of their means."""
    shared = sorted(set(ours.sums) & set(theirs.sums))
    correlations = [float(np.corrcoef(ours.vector(name), theirs.vector(name))[0, 1]) for name in shared]
    ratios = [float(ours.vector(name).mean() / theirs.vector(name).mean()) for name in shared]
    return (f"{len(shared)} weights in both (llama-imatrix leaves out the token embedding, and the output head unless given --process-output); "
            f"correlation of the vectors: median {np.median(correlations):.4f}, min {min(correlations):.4f}; "
            f"ratio of means ours/theirs: median {np.median(ratios):.3f}, range {min(ratios):.3f}..{max(ratios):.3f}")


def scored(base: Path, files: list[Path], eval_text: Path, args, work: Path) -> dict[str, CompareReport]:
    """File name -> its compare report; reports are kept in --work/reports.json, keyed by file size, modification
    time and evaluation settings, so that re-running the script after a change elsewhere scores only new files."""
    store = work / "reports.json"
    kept = json.loads(store.read_text()) if store.exists() else {}
    settings = f"{args.ctx}x{args.chunks}"

    def key(path: Path) -> str:
        return f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}:{settings}"

    # one file at a time (the base's log-probabilities are cached), kept as soon as scored
    for path in [path for path in files if key(path) not in kept]:
        started = time.perf_counter()
        report = compare(base, [path], text=eval_text, ctx=args.ctx, chunks=args.chunks, cache_dir=work / "cache",
                         threads=args.threads, progress=False)[1]
        kept[key(path)] = {**report.to_dict(), "is_base": False, "text": report.text, "ctx": report.ctx,
                           "chunks": report.chunks}
        store.write_text(json.dumps(kept, indent=1))
        print(f"scored {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return {path.name: CompareReport(**kept[key(path)]) for path in files}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank_x, rank_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def print_and_write(args, rows: list[Row], measured, predictions, timing, agreement: str, counts: str) -> None:
    lines = ["| file | imatrix | MiB | bpw | KLD | +/- | top-1 % | PPL | predicted KLD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, prediction in zip(rows, predictions[DEFAULT_METRIC]):
        report = measured[row.path.name]
        lines.append(f"| {row.label} | {row.imatrix_label} | {report.bytes / 2**20:.2f} | "
                     f"{report.bpw:.3f} | {report.kld:.5f} | {report.kld_se:.5f} | {100 * report.top1:.2f} | "
                     f"{report.ppl:.3f} | {'' if prediction is None else f'{prediction:.5f}'} |")
    ratios = []
    for row in rows:
        if row.side == "ours" and row.mix:
            peer = measured[f"llama-{row.mix}{'-imatrix' if row.imatrix else ''}.gguf"]
            ours = measured[row.path.name]
            ratios.append(f"| {row.mix} | {row.imatrix_label} | {row.candidates} | {peer.bytes:,} | {ours.bytes:,} | "
                          f"{ours.bytes / peer.bytes:.4f} | {peer.kld:.5f} | {ours.kld:.5f} | "
                          f"**{ours.kld / peer.kld:.3f}** |")
    fits = {}
    for metric in METRICS:
        points = [(prediction, measured[row.path.name].kld) for row, prediction in zip(rows, predictions[metric])
                  if prediction is not None]
        predicted = np.array([point[0] for point in points])
        observed = np.array([point[1] for point in points])
        slope = float((predicted * observed).sum() / (predicted * predicted).sum())
        fits[metric] = (len(points), spearman(predicted, observed), slope, predicted, observed)
    count, rho, slope, predicted, observed = fits[DEFAULT_METRIC]
    small = predicted <= SMALL_ERROR
    small_ratio = float(np.median(observed[small] / predicted[small]))
    exponent = float(np.polyfit(np.log(predicted), np.log(observed), 1)[0])
    model_name = Path(args.model).name
    plot = plot_results(model_name, rows, measured, predicted, observed, slope)
    other = next(metric for metric in METRICS if metric != DEFAULT_METRIC)
    phases = ", ".join(f"{name} {value:.0f} s" for name, value in timing["phases"].items())
    def fewer(value: int, default: int) -> str:
        return f" (fewer than the default {default}, to keep the CPU run short)" if value < default else ""

    body = "\n".join([
        f"Model {model_name}; calibration: first half of the Debian reference, {args.tokens} tokens"
        f"{fewer(args.tokens, DEFAULT_CALIBRATION_TOKENS)} in chunks of {args.ctx} for both tools; evaluation: its last quarter, "
        f"{args.chunks} x {args.ctx} tokens{fewer(args.chunks, DEFAULT_CHUNKS)}; KLD against the F32 conversion. Ours: `--method optimal --target-size <the llama.cpp file's "
        "bytes>` with two candidate sets: *all* = every type we encode (the default; MXFP4 for expert tensors only), "
        "*k-quants* = "
        f"`--types {KQUANT_CANDIDATES}` (a tensor whose rows a k-quant cannot hold gets llama.cpp's fallback, "
        "Q4_K -> Q5_0 etc., as in llama-quantize's own mixes)."
        + (" imatrix *unit*: `--imatrix unit`, ggml's importance-weighted encoders given equal weights for every "
           "column: an error-minimizing search that needs no calibration data (the plan's alpha still comes from the "
           "calibration), compared with llama.cpp's files made without imatrix." if args.unit_importance else ""),
        "",
        "| mix | imatrix | candidates | llama.cpp bytes | our bytes | size ratio | llama.cpp KLD | our KLD | "
        "KLD ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        *ratios,
        "",
        f"Tensors stored in a 32-block ({', '.join(EXTRA_TYPES[:4])}) or IQ4 ({', '.join(EXTRA_TYPES[4:])}) type, "
        f"{counts}. In the k-quants plans and llama.cpp's files these are all fallbacks for rows a k-quant cannot "
        "hold.",
        "",
        *lines,
        "",
        f"Linearity check: {count} plans, predicted sum(alpha x t2) ({DEFAULT_METRIC} errors) vs measured KLD: "
        f"Spearman {rho:.3f}; least-squares slope measured/predicted {slope:.3f} over all plans (1 would be exact), "
        f"dominated by the largest errors; median measured/predicted {small_ratio:.3f} over the {int(small.sum())} "
        f"plans predicted at most {SMALL_ERROR} (the small-error regime the theorem is about); log-log slope "
        f"{exponent:.3f} (the KL grows more slowly than the sum once it is large). With {other} errors: "
        f"Spearman {fits[other][1]:.3f}, slope {fits[other][2]:.3f}.",
        "",
        f"Calibration of {model_name} on CPU ({args.threads} torch thread{'s' if args.threads > 1 else ''}, "
        "CPU shared with other jobs, "
        f"load average after {' '.join(timing['loadavg_after'])}): {timing['wall']:.0f} s wall ({phases}).",
        "",
        f"Importance vectors, ours against llama-imatrix's on the same calibration text: {agreement}.",
        "",
        f"![size vs KLD]({plot.relative_to(RESULTS.parent)})",
    ])
    print(body)
    if not args.no_write:
        update_section(RESULTS, f"{TITLE}: {model_name}", body,
                       "python -m scripts.bench.optimal " + shown_arguments(sys.argv[1:]))


def plot_results(model_name: str, rows: list[Row], measured, predicted, observed, slope) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = RESULTS.parent / f"optimal_vs_llama_{model_name}.png"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labelled = set()
    for row in rows:
        report = measured[row.path.name]
        marker = {"llama.cpp": "s", "ours": "^" if row.candidates == "k-quants" else "o"}[row.side]
        color = {("llama.cpp", "no"): "tab:red", ("llama.cpp", "yes"): "darkred", ("ours", "no"): "tab:blue",
                 ("ours", "yes"): "tab:green", ("ours", "unit"): "tab:purple"}[row.side, row.imatrix_label]
        # peer-size files sit on top of each other: a legend names them, the other points are annotated
        category = (f"{'llama.cpp' if row.side == 'llama.cpp' else 'ours optimal, ' + row.candidates}"
                    f"{' +imatrix' if row.imatrix else ' +unit importance' if row.unit else ''}")
        legend = category if row.mix and category not in labelled else None
        labelled.add(category)
        left.scatter(report.bytes / 2**20, report.kld, marker=marker, color=color, label=legend,
                     facecolors="none" if row.candidates == "k-quants" else color)
        if not row.mix:
            left.annotate(row.label, (report.bytes / 2**20, report.kld), fontsize=7, textcoords="offset points",
                          xytext=(3, 3))
    left.legend(fontsize=7, loc="lower left")
    left.set_yscale("log")
    left.set_xlabel("file size (MiB)")
    left.set_ylabel("KLD vs F32 (nats/token)")
    left.set_title(f"{model_name}: size vs KLD")
    right.loglog(predicted, observed, "o")
    limits = [min(predicted.min(), observed.min()) * 0.8, max(predicted.max(), observed.max()) * 1.2]
    right.plot(limits, limits, ":", color="gray", label="measured = predicted")
    right.plot(limits, [limit * slope for limit in limits], "--", label=f"least squares: {slope:.2f} x predicted")
    right.set_xlabel("predicted KLD (sum alpha x t2)")
    right.set_ylabel("measured KLD")
    right.set_title("linearity check")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
