"""Gradient (Fisher) sensitivities against noise injection, and the optimal plans made from each.

    python -m scripts.bench.sensitivity [--model models/smollm2] [--tokens 32768] [--chunks 20] [--threads 2]

Two calibrations of one model on the same calibration text (the first half of Debian's reference manual): the
default one (`--sensitivity fisher`, one block in memory) and the reference (`--sensitivity noise`). Printed:
- agreement of the alphas: Spearman correlation over every weight, and the spread of their ratio;
- optimal plans from each (`--method optimal`, no imatrix) at the sizes of llama.cpp's Q4_K_M and Q3_K_M files of
  the same model and at --bpw bits per weight, each scored by KL divergence to the F32 conversion on the last
  quarter of the same manual (text that is not calibrated on), with the plan's predicted KLD (and, for gradient
  calibrations, its 90% interval over calibration sequences);
- whether a larger plan ever measures a higher KLD than a smaller one of the same calibration (monotonicity).
Steps are cached in --work (delete a file to redo it). Writes "Sensitivities: gradients vs noise: <model>" in
docs/results.md unless --no-write.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ewq_gguf import llamacpp
from ewq_gguf.api import convert
from ewq_gguf.calibrate import Calibration, calibrate
from ewq_gguf.constants import (DEFAULT_CALIBRATION_CTX, DEFAULT_CALIBRATION_TOKENS, DEFAULT_SENSITIVITY_TOKENS,
                                SENSITIVITY_METHODS)
from ewq_gguf.devenv import dev_model
from scripts.bench.optimal import scored, spearman, split_text, step
from scripts.common.llama_tools import run_measured
from scripts.common.results_file import cpu_name, shown, shown_arguments, update_section

PEER_MIXES = ("Q3_K_M", "Q4_K_M")
NOISE_TOKENS = DEFAULT_SENSITIVITY_TOKENS["noise"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=dev_model("smollm2"))
    parser.add_argument("--work", type=Path, default=Path("out/bench-sensitivity"))
    parser.add_argument("--tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                        help="activation tokens of both calibrations")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CALIBRATION_CTX)
    parser.add_argument("--chunks", type=int, default=20, help="evaluation chunks of --ctx tokens")
    parser.add_argument("--noise-tokens", type=int, default=NOISE_TOKENS,
                        help=f"tokens of the noise-injection reference (its default {NOISE_TOKENS}; more is a steadier "
                             "reference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bpw", type=lambda text: [float(v) for v in text.split(",")], default=[4.5, 5.0, 5.5, 6.0, 7.0])
    parser.add_argument("--results", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quantize_tool = llamacpp.tool("llama-quantize")
    if quantize_tool is None:
        sys.exit("llama-quantize is not built: bash vendor/build_llama_tools.sh")
    work = args.work / args.model.name
    work.mkdir(parents=True, exist_ok=True)
    calib_text, eval_text = split_text(work)
    base = step(work / "base-F32.gguf", lambda out: convert(args.model, out, "uniform", type="F32", progress=False))
    peers = {mix: step(work / f"llama-{mix}.gguf", lambda out, mix=mix: run_measured(
        [quantize_tool, base, out, mix, str(args.threads)])) for mix in PEER_MIXES}

    calibrations, seconds = {}, {}
    for method in SENSITIVITY_METHODS:
        noise_tokens = {"sensitivity_tokens": args.noise_tokens} if method == "noise" else {}
        suffix = f"-{args.noise_tokens}" if method == "noise" and args.noise_tokens != NOISE_TOKENS else ""

        def run(out: Path, method=method, options=noise_tokens) -> None:
            started = time.perf_counter()
            result = calibrate(args.model, calib_text, tokens=args.tokens, ctx=args.ctx, device="cpu",
                               sensitivity=method, threads=args.threads, progress=False, **options)
            result.seconds["wall"] = time.perf_counter() - started
            result.save(out)
        calibrations[method] = Calibration.load(step(work / f"calib-{method}{suffix}.json", run, partial=False))
        seconds[method] = calibrations[method].seconds

    names = sorted(calibrations["noise"].sensitivity)
    agreement = []
    for weighted in (False, True):
        values = {method: np.array([calibrations[method].alpha(name, weighted) for name in names])
                  for method in SENSITIVITY_METHODS}
        positive = values["noise"] > 0
        ratio = values["fisher"][positive] / values["noise"][positive]
        # each method's alpha_weighted goes with its own error weighting (Calibration.error_weights): fisher's with
        # the Fisher's rows and columns, noise's with the activations' columns
        label = "alpha_weighted (each with its own error weighting)" if weighted else "alpha"
        agreement.append(f"{label}: Spearman "
                         f"**{spearman(values['fisher'], values['noise']):.3f}** over {len(names)} weights, "
                         f"fisher/noise median {np.median(ratio):.3f}, 5-95% {np.percentile(ratio, 5):.3f}.."
                         f"{np.percentile(ratio, 95):.3f}")

    targets = [(f"{mix} size", {"target_size": peers[mix].stat().st_size}) for mix in PEER_MIXES]
    targets += [(f"{bpw} bpw", {"target_bpw": bpw}) for bpw in args.bpw]
    files, plans = {}, {}
    for method in SENSITIVITY_METHODS:
        for label, target in targets:
            suffix = f"-{args.noise_tokens}" if method == "noise" and args.noise_tokens != NOISE_TOKENS else ""
            path = work / f"{method}{suffix}-{label.replace(' ', '-')}.gguf"
            made = {}

            def make(out: Path, method=method, target=target) -> None:
                made["plan"] = convert(args.model, out, "optimal", calibration=calibrations[method], progress=False,
                                       **target).plan
            step(path, make)
            files[method, label] = path
            plan_file = path.with_suffix(".params.json")
            if "plan" in made:
                plan_file.write_text(json.dumps(made["plan"].params))
            plans[method, label] = json.loads(plan_file.read_text())
    reports = scored(base, list(files.values()) + list(peers.values()), eval_text, args, work)

    rows = ["| target | llama.cpp KLD | bytes | fisher KLD | noise KLD | fisher/noise | fisher predicted (90%) | "
            "noise predicted |", "|---|---|---|---|---|---|---|---|"]
    for label, _ in targets:
        fisher, noise = (reports[files[method, label].name] for method in SENSITIVITY_METHODS)
        peer = reports[peers[label.split()[0]].name] if label.split()[0] in peers else None
        interval = plans["fisher", label].get("predicted_kld_90") or [float("nan")] * 2
        rows.append(f"| {label} | {'' if peer is None else f'{peer.kld:.5f}'} | {fisher.bytes:,} | {fisher.kld:.5f} | "
                    f"{noise.kld:.5f} | **{fisher.kld / noise.kld:.3f}** | "
                    f"{plans['fisher', label]['predicted_kld']:.5f} ({interval[0]:.5f}..{interval[1]:.5f}) | "
                    f"{plans['noise', label]['predicted_kld']:.5f} |")
    monotone = []
    for method in SENSITIVITY_METHODS:
        ordered = sorted((reports[files[method, label].name] for label, _ in targets), key=lambda report: report.bytes)
        breaks = [f"{a.bytes:,} B: {a.kld:.5f} < {b.bytes:,} B: {b.kld:.5f}" for a, b in zip(ordered, ordered[1:])
                  if b.kld > a.kld]
        monotone.append(f"{method}: " + ("monotone (every larger plan measures a lower KLD)" if not breaks
                                         else "NOT monotone: " + "; ".join(breaks)))
    load = Path("/proc/loadavg").read_text().split()[0]
    timing = "; ".join(f"{method} {seconds[method]['wall']:.0f} s ("
                       + ", ".join(f"{k} {v:.0f} s" for k, v in seconds[method].items() if k != "wall") + ")"
                       for method in SENSITIVITY_METHODS)
    body = "\n".join([
        f"Model {shown(args.model)}; calibration: first half of Debian's reference manual, {args.tokens} tokens in "
        f"chunks of {args.ctx} (fisher: gradients over {calibrations['fisher'].sensitivity_tokens} tokens; noise: "
        f"noise injection over {calibrations['noise'].sensitivity_tokens} tokens); evaluation: its last quarter, "
        f"{args.chunks} x {args.ctx} tokens, KLD against the F32 conversion. Plans: `--method optimal`, no imatrix.",
        "", *[f"- {line}" for line in agreement], "", *rows, "", *[f"- {line}" for line in monotone], "",
        f"Calibration wall time ({args.threads} threads, {cpu_name()}, load average {load} at the end): {timing}.",
    ])
    print(body)
    if not args.no_write:
        reference = f", noise on {args.noise_tokens} tokens" if args.noise_tokens != NOISE_TOKENS else ""
        update_section(args.results, f"Sensitivities: gradients vs noise: {args.model.name}{reference}", body,
                       "python -m scripts.bench.sensitivity " + shown_arguments(sys.argv[1:]))


if __name__ == "__main__":
    main()
