"""Optimal plans (linearity theorem) against llama.cpp's Q4_K_M and Q3_K_M at the same file size, and the check of
the linear prediction itself. Writes the "Optimal plans vs llama-quantize" section of docs/results.md.

    python scripts/bench_optimal.py [--model /work/devmodels/smollm2] [--chunks 40] [--threads 1]

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
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_tools import run_measured, tool_path  # noqa: E402
from results_file import update_section  # noqa: E402

from ewq_gguf.api import convert  # noqa: E402
from ewq_gguf.calibrate import Calibration, calibrate  # noqa: E402
from ewq_gguf.imatrix import ImportanceMatrix  # noqa: E402
from ewq_gguf.plan.optimal import DEFAULT_METRIC, METRICS, predicted_kld  # noqa: E402
from ewq_gguf.plan.reuse import plan_from_file  # noqa: E402
from ewq_gguf.source.model import open_checkpoint  # noqa: E402
from ewq_gguf.validate import CompareReport, compare  # noqa: E402

DEBIAN_REFERENCE = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
PEER_MIXES = ("Q4_K_M", "Q3_K_M")
LINEARITY_BPW = (4.25, 4.75, 5.25, 6.0, 7.0)
LINEARITY_UNIFORM = ("Q4_0", "Q4_1", "Q5_0", "Q8_0")
SMALL_ERROR = 0.1      # predicted KLD below which the linear regime is summarised
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results.md"
TITLE = "Optimal plans vs llama-quantize"


def split_text(work: Path) -> tuple[Path, Path]:
    """First half -> calibration text, last quarter -> evaluation text."""
    calib, evaluation = work / "calib.txt", work / "eval.txt"
    if not calib.exists():
        text = gzip.decompress(DEBIAN_REFERENCE.read_bytes()).decode("utf-8")
        calib.write_text(text[: len(text) // 2])
        evaluation.write_text(text[3 * len(text) // 4:])
    return calib, evaluation


def step(path: Path, make) -> Path:
    if not path.exists():
        started = time.perf_counter()
        make()
        print(f"made {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/devmodels/smollm2")
    parser.add_argument("--work", default="out/bench-optimal")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens for both tools")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=40, help="evaluation chunks of --ctx tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU runs faster on fewer)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quantize_tool, imatrix_tool = tool_path("llama-quantize"), tool_path("llama-imatrix")
    if quantize_tool is None or imatrix_tool is None:
        sys.exit("llama-quantize / llama-imatrix not built: run vendor/build_llama_tools.sh")
    calib_text, eval_text = split_text(work)
    n_chunks = args.tokens // args.ctx

    base = step(work / "base-F32.gguf", lambda: convert(args.model, work / "base-F32.gguf", "uniform", type="F32",
                                                         progress=False))
    llama_imatrix = step(work / "llama.imatrix.gguf", lambda: run_measured(
        [imatrix_tool, "-m", base, "-f", calib_text, "-c", args.ctx, "--chunks", n_chunks, "-o",
         work / "llama.imatrix.gguf", "--no-ppl", "-t", "2"]))
    calibration_path = work / "calib.json"
    timing_path = work / "calib-timing.json"

    def run_calibration() -> None:
        started = time.perf_counter()
        calibration = calibrate(args.model, calib_text, tokens=args.tokens, ctx=args.ctx, device="cpu",
                                threads=args.threads, progress=False)
        wall = time.perf_counter() - started
        calibration.save(calibration_path)
        load = Path("/proc/loadavg").read_text().split()[:3]
        timing_path.write_text(json.dumps({"wall": wall, "phases": calibration.seconds, "loadavg_after": load}))

    step(calibration_path, run_calibration)
    calibration = Calibration.load(calibration_path)
    model = open_checkpoint(args.model)

    rows = []   # (label, file, side, imatrix, error table the prediction uses or None)
    for mix in PEER_MIXES:
        for with_imatrix in (False, True):
            suffix = "-imatrix" if with_imatrix else ""
            peer = work / f"llama-{mix}{suffix}.gguf"
            extra = ["--imatrix", llama_imatrix] if with_imatrix else []
            step(peer, lambda: run_measured([quantize_tool, *extra, base, peer, mix, "2"]))
            ours = work / f"ours-optimal-{mix}-size{suffix}.gguf"
            options = {"imatrix": calibration_path} if with_imatrix else {}
            step(ours, lambda: convert(args.model, ours, "optimal", calibration=calibration,
                                       target_size=peer.stat().st_size, progress=False, **options))
            # llama.cpp's imatrix is not ours: its files' errors are not in our tables
            rows.append((f"llama.cpp {mix}", peer, "llama.cpp", with_imatrix, None if with_imatrix else "plain"))
            rows.append((f"ours optimal @ {mix} size", ours, "ours", with_imatrix,
                         "imatrix" if with_imatrix else "plain"))
    for bpw in LINEARITY_BPW:
        path = work / f"ours-optimal-{bpw}bpw.gguf"
        step(path, lambda: convert(args.model, path, "optimal", calibration=calibration, target_bpw=bpw,
                                   progress=False))
        rows.append((f"ours optimal {bpw} bpw", path, "ours", False, "plain"))
    for qtype in LINEARITY_UNIFORM:
        path = work / f"ours-uniform-{qtype}.gguf"
        step(path, lambda: convert(args.model, path, "uniform", type=qtype, progress=False))
        rows.append((f"ours uniform {qtype}", path, "ours", False, "plain"))

    measured = scored(base, [row[1] for row in rows], eval_text, args, work)
    predictions = {metric: [None if variant is None else predicted_kld(plan_from_file(model, path), calibration,
                                                                       variant, metric)
                            for _, path, _, _, variant in rows] for metric in METRICS}
    agreement = imatrix_agreement(calibration.imatrix, ImportanceMatrix.load(llama_imatrix))
    print_and_write(args, rows, measured, predictions, json.loads(timing_path.read_text()), agreement)


def imatrix_agreement(ours: ImportanceMatrix, theirs: ImportanceMatrix) -> str:
    """How close our importance vectors are to llama-imatrix's on the same text: per shared weight, the
    correlation of the two vectors and the ratio of their means."""
    shared = sorted(set(ours.sums) & set(theirs.sums))
    correlations = [float(np.corrcoef(ours.vector(name), theirs.vector(name))[0, 1]) for name in shared]
    ratios = [float(ours.vector(name).mean() / theirs.vector(name).mean()) for name in shared]
    return (f"{len(shared)} weights in both (llama-imatrix leaves out the token embedding / tied head); "
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

    missing = [path for path in files if key(path) not in kept]
    if missing:
        reports = compare(base, missing, text=eval_text, ctx=args.ctx, chunks=args.chunks, cache_dir=work / "cache",
                          progress=False)
        for path, report in zip(missing, reports[1:]):
            kept[key(path)] = {**report.to_dict(), "is_base": False, "text": report.text, "ctx": report.ctx,
                               "chunks": report.chunks}
        store.write_text(json.dumps(kept, indent=1))
    return {path.name: CompareReport(**kept[key(path)]) for path in files}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank_x, rank_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def print_and_write(args, rows, measured, predictions, timing, agreement: str) -> None:
    lines = ["| file | imatrix | MiB | bpw | KLD | +/- | top-1 % | PPL | predicted KLD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (label, path, _, with_imatrix, _), prediction in zip(rows, predictions[DEFAULT_METRIC]):
        report = measured[path.name]
        lines.append(f"| {label} | {'yes' if with_imatrix else 'no'} | {report.bytes / 2**20:.2f} | {report.bpw:.3f} | "
                     f"{report.kld:.5f} | {report.kld_se:.5f} | {100 * report.top1:.2f} | {report.ppl:.3f} | "
                     f"{'' if prediction is None else f'{prediction:.5f}'} |")
    ratios = []
    for mix in PEER_MIXES:
        for with_imatrix in (False, True):
            suffix = "-imatrix" if with_imatrix else ""
            peer = measured[f"llama-{mix}{suffix}.gguf"]
            ours = measured[f"ours-optimal-{mix}-size{suffix}.gguf"]
            ratios.append(f"| {mix} | {'yes' if with_imatrix else 'no'} | {peer.bytes:,} | {ours.bytes:,} | "
                          f"{ours.bytes / peer.bytes:.4f} | {peer.kld:.5f} | {ours.kld:.5f} | "
                          f"**{ours.kld / peer.kld:.3f}** |")
    fits = {}
    for metric in METRICS:
        points = [(prediction, measured[row[1].name].kld) for row, prediction in zip(rows, predictions[metric])
                  if prediction is not None]
        predicted = np.array([point[0] for point in points])
        observed = np.array([point[1] for point in points])
        slope = float((predicted * observed).sum() / (predicted * predicted).sum())
        fits[metric] = (len(points), spearman(predicted, observed), slope, predicted, observed)
    count, rho, slope, predicted, observed = fits[DEFAULT_METRIC]
    small = predicted <= SMALL_ERROR
    small_ratio = float(np.median(observed[small] / predicted[small]))
    exponent = float(np.polyfit(np.log(predicted), np.log(observed), 1)[0])
    plot = plot_results(rows, measured, predicted, observed, slope)
    other = next(metric for metric in METRICS if metric != DEFAULT_METRIC)
    phases = ", ".join(f"{name} {value:.0f} s" for name, value in timing["phases"].items())
    body = "\n".join([
        f"Model {Path(args.model).name}; calibration: first half of the Debian reference, {args.tokens} tokens in "
        f"chunks of {args.ctx} for both tools; evaluation: its last quarter, {args.chunks} x {args.ctx} tokens; "
        "KLD against the F32 conversion. Ours: `--method optimal --target-size <the llama.cpp file's bytes>`, "
        "candidate types: every type we encode.",
        "",
        "| mix | imatrix | llama.cpp bytes | our bytes | size ratio | llama.cpp KLD | our KLD | KLD ratio |",
        "|---|---|---|---|---|---|---|---|",
        *ratios,
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
        f"Calibration of {Path(args.model).name} on CPU ({args.threads} torch thread, CPU shared with other jobs, "
        f"load average after {' '.join(timing['loadavg_after'])}): {timing['wall']:.0f} s wall ({phases}).",
        "",
        f"Importance vectors, ours against llama-imatrix's on the same calibration text: {agreement}.",
        "",
        f"![size vs KLD]({plot.relative_to(RESULTS.parent)})",
    ])
    print(body)
    if not args.no_write:
        update_section(RESULTS, TITLE, body, "python scripts/bench_optimal.py " + " ".join(sys.argv[1:]))


def plot_results(rows, measured, predicted, observed, slope) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = RESULTS.parent / "optimal_vs_llama.png"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, file, side, with_imatrix, _ in rows:
        report = measured[file.name]
        marker = ("s" if side == "llama.cpp" else "o")
        color = "tab:red" if side == "llama.cpp" else ("tab:green" if with_imatrix else "tab:blue")
        left.scatter(report.bytes / 2**20, report.kld, marker=marker, color=color)
        left.annotate(label + (" +imatrix" if with_imatrix else ""), (report.bytes / 2**20, report.kld), fontsize=7,
                      textcoords="offset points", xytext=(3, 3))
    left.set_yscale("log")
    left.set_xlabel("file size (MiB)")
    left.set_ylabel("KLD vs F32 (nats/token)")
    left.set_title("size vs KLD (squares: llama-quantize)")
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
