"""Benchmark ewq-gguf's perplexity and compare against llama.cpp's llama-perplexity on the same GGUF files and text.

    python -m scripts.bench.perplexity BASE.gguf [CANDIDATE.gguf] [--text FILE] [--ctx 512] [--chunks 10]
                                       [--threads N] [--repeats 1] [--no-write]

Runs, each as its own process and timed from the outside (wall time, peak RSS):
  ewq-gguf perplexity BASE                   vs  llama-perplexity -m BASE
  ewq-gguf compare BASE CANDIDATE (cold)     vs  llama-perplexity --kl-divergence-base on BASE, then
                                                 --kl-divergence on CANDIDATE
  ewq-gguf compare BASE CANDIDATE (cached)   vs  llama-perplexity --kl-divergence (CANDIDATE) alone
prints PPL, KLD, top-1 agreement and times of both side by side, and replaces this script's section of
docs/results.md (unless --no-write). llama-perplexity is the one vendor/build_llama_tools.sh builds (found by
ewq_gguf.llamacpp); without it only ewq-gguf's numbers are shown. CPU only: both run with --gpu-layers 0 and the same
thread count.
With --repeats N the whole sequence runs N times, ours and llama.cpp's interleaved, and each step keeps its fastest
wall time (the numbers themselves are identical every time).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ewq_gguf import llamacpp
from ewq_gguf.devenv import REPOSITORY
from scripts.common.llama_tools import MeasuredRun, run_measured
from scripts.common.results_file import cpu_name, shown, shown_arguments, update_section

RESULTS_FILE = REPOSITORY / "docs" / "results.md"
RESULTS_TITLE = "Perplexity and KL divergence: ewq-gguf vs llama-perplexity, {threads} thread(s)"
NUMBER = r"([-+]?[\d.]+(?:[eE][-+]?\d+)?)"


@dataclass
class TimedRun:
    """A finished run and the CPU seconds (user + system) its process used: on a shared machine CPU time shows the
    work done, which wall time (what the goal is stated in) hides under other processes' load."""

    run: MeasuredRun
    cpu_s: float


@dataclass
class Measured:
    """One tool's numbers for one step, with its fastest run."""

    values: dict[str, float]
    timed: TimedRun


@dataclass
class Step:
    name: str
    command: list[str]
    before: Callable[[], None] | None = None


def run_timed(command: list[str]) -> TimedRun:
    # Children's usage grows by exactly this child's when it is reaped; runs are sequential.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = run_measured(command)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return TimedRun(run, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def run_interleaved(steps: list[Step], repeats: int) -> dict[str, TimedRun]:
    """Run the steps in order, `repeats` times over, keeping each step's fastest run. Interleaving ours and
    llama.cpp's runs lets both see the same background load on a shared machine."""
    best: dict[str, TimedRun] = {}
    for _ in range(repeats):
        for step in steps:
            if step.before:
                step.before()
            timed = run_timed(step.command)
            if step.name not in best or timed.run.wall_s < best[step.name].run.wall_s:
                best[step.name] = timed
    return best


def evaluation_text(text: Path | None) -> Path:
    """The text ewq-gguf would use. Asked in a child process: importing ewq_gguf here would make this process big,
    and every child forked from it would start with (and report as peak RSS) that size."""
    code = "import sys; from ewq_gguf.text import load_text; print(load_text(sys.argv[1] or None).source)"
    found = subprocess.run([sys.executable, "-c", code, str(text or "")], capture_output=True, text=True,
                           cwd=REPOSITORY)
    if found.returncode != 0:
        raise SystemExit(found.stderr.strip().splitlines()[-1])
    return Path(found.stdout.strip())


def ours_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "ewq_gguf.cli", *arguments]


def extract_json(output: str, opening: str):
    """The JSON document our CLI printed; the captured output also holds progress bars (stderr)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(re.escape(opening) + r"\n", output):
        try:
            return decoder.raw_decode(output, match.start())[0]
        except ValueError:
            continue
    raise SystemExit(f"no JSON in ewq-gguf's output:\n{output[-3000:]}")


def parse_llama(output: str, patterns: dict[str, str]) -> dict[str, float]:
    values = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, output)
        if match is None:
            raise SystemExit(f"llama-perplexity output has no '{name}' ({pattern}):\n{output[-3000:]}")
        values[name] = float(match.group(1))
        if match.lastindex and match.lastindex > 1:
            values[name + "_se"] = float(match.group(2))
    return values


def plain_text_file(source: Path, folder: Path) -> Path:
    """llama-perplexity reads plain text only: decompress a .gz once."""
    if source.suffix != ".gz":
        return source
    plain = folder / source.stem
    plain.write_bytes(gzip.decompress(source.read_bytes()))
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("candidate", type=Path, nargs="?")
    parser.add_argument("--text", type=Path, help="default: the text ewq-gguf finds on this machine")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()

    text = evaluation_text(args.text)
    llama_perplexity = llamacpp.tool("llama-perplexity")
    common = ["--ctx", str(args.ctx), "--chunks", str(args.chunks), "--threads", str(args.threads),
              "--gpu-layers", "0", "--json"]
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-perplexity-") as scratch:
        scratch = Path(scratch)
        plain_text = plain_text_file(text, scratch)
        llama_common = ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads), "-ngl", "0"]
        cache = scratch / "cache"
        base_logits = scratch / "base.kld"

        def clear_cache() -> None:
            for entry in cache.glob("*/*"):
                entry.unlink()

        steps = [Step("ours perplexity", ours_command("perplexity", str(args.base), "--text", str(text), *common))]
        if llama_perplexity:
            steps.append(Step("llama perplexity",
                              [str(llama_perplexity), "-m", str(args.base), "-f", str(plain_text), *llama_common]))
        if args.candidate:
            compare_arguments = ours_command("compare", str(args.base), str(args.candidate), "--text", str(text),
                                             "--cache-dir", str(cache), *common)
            steps += [Step("ours compare cold", compare_arguments, clear_cache),
                      Step("ours compare cached", compare_arguments)]
            if llama_perplexity:
                steps += [Step("llama kld base", [str(llama_perplexity), "-m", str(args.base), "-f", str(plain_text),
                                                  *llama_common, "--kl-divergence-base", str(base_logits)]),
                          Step("llama kld", [str(llama_perplexity), "-m", str(args.candidate), *llama_common,
                                             "--kl-divergence-base", str(base_logits), "--kl-divergence"])]
        runs = run_interleaved(steps, args.repeats)

    ours_report = extract_json(runs["ours perplexity"].run.output, "{")
    ours = Measured({"ppl": ours_report["ppl"], "ppl_se": ours_report["ppl_se"]}, runs["ours perplexity"])
    theirs = None
    if llama_perplexity:
        theirs = Measured(parse_llama(runs["llama perplexity"].run.output,
                                      {"ppl": rf"Final estimate: PPL = {NUMBER}\s*\+/-\s*{NUMBER}"}),
                          runs["llama perplexity"])
    rows = comparison_rows(f"PPL of {args.base.name}", ours, theirs, "ppl", "{:.4f}")
    rows += time_rows(f"perplexity ({args.chunks} x {args.ctx} tokens)", [ours.timed],
                      [theirs.timed] if theirs else None)
    rows.append(rss_row("perplexity peak RSS MiB", ours.timed, theirs.timed if theirs else None))
    if args.candidate:
        candidate_report = extract_json(runs["ours compare cached"].run.output, "[")[1]
        ours_kld = Measured({key: candidate_report[key] for key in ("kld", "kld_se", "kld_p99", "top1", "ppl",
                                                                      "ppl_se")}, runs["ours compare cached"])
        theirs_kld = None
        if llama_perplexity:
            values = parse_llama(runs["llama kld"].run.output, {
                "ppl": rf"Mean PPL\(Q\)\s*:\s*{NUMBER}\s*±\s*{NUMBER}",
                "kld": rf"Mean    KLD:\s*{NUMBER}\s*±\s*{NUMBER}",
                "kld_p99": rf"99\.0%   KLD:\s*{NUMBER}",
                "top1": rf"Same top p:\s*{NUMBER}\s*±\s*{NUMBER} %",
            })
            values["top1"] /= 100
            values["top1_se"] /= 100
            theirs_kld = Measured(values, runs["llama kld"])
        name = args.candidate.name
        rows += comparison_rows(f"KLD {name}", ours_kld, theirs_kld, "kld", "{:.6f}")
        rows += comparison_rows(f"KLD p99 {name}", ours_kld, theirs_kld, "kld_p99", "{:.5f}", with_se=False)
        rows += comparison_rows(f"top-1 agreement {name}", ours_kld, theirs_kld, "top1", "{:.4f}")
        rows += comparison_rows(f"PPL of {name}", ours_kld, theirs_kld, "ppl", "{:.4f}")
        rows += time_rows("compare, base logits not cached", [runs["ours compare cold"]],
                          [runs["llama kld base"], runs["llama kld"]] if theirs_kld else None)
        rows += time_rows("compare, base logits cached", [ours_kld.timed], [theirs_kld.timed] if theirs_kld else None)
        rows.append(rss_row("compare peak RSS MiB (cached)", ours_kld.timed, theirs_kld.timed if theirs_kld else None))

    table = markdown_table(rows)
    setup = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_name()}, {os.cpu_count()} logical CPUs, "
             f"load average {load_before[0]:.1f} before the runs; {args.threads} thread(s), CPU only; "
             f"text {shown(text)}, {args.chunks} chunks x {args.ctx} tokens; "
             f"fastest of {args.repeats} interleaved run(s) per cell; "
             f"llama-perplexity: {tool_label(llama_perplexity)}")
    print(setup)
    print(table)
    if not args.no_write:
        files = args.base.name + (f" against {args.candidate.name}" if args.candidate else "")
        command = "python -m scripts.bench.perplexity " + shown_arguments(sys.argv[1:])
        update_section(RESULTS_FILE, RESULTS_TITLE.format(threads=args.threads), f"{files}. {setup}.\n\n{table}",
                       command)
        print(f"updated {RESULTS_FILE}")


def tool_label(tool: Path | None) -> str:
    """Which llama.cpp tool ran, in words that name no folder of this machine."""
    if tool is None:
        return "not built (vendor/build_llama_tools.sh)"
    if os.environ.get("EWQ_LLAMA_BIN"):
        return f"{tool.name} from EWQ_LLAMA_BIN"
    return f"{tool.name} of llama-cpp-python {llamacpp.pinned_version()}'s llama.cpp"


def comparison_rows(label: str, ours: Measured, theirs: Measured | None, key: str, number_format: str,
                    with_se: bool = True) -> list[tuple[str, str, str, str]]:
    def cell(measured: Measured | None) -> str:
        if measured is None:
            return "-"
        text = number_format.format(measured.values[key])
        se = measured.values.get(key + "_se")
        return f"{text} ± {number_format.format(se)}" if with_se and se is not None else text

    difference = "-"
    if theirs is not None:
        difference = f"{ours.values[key] - theirs.values[key]:+.2e}"
    return [(label, cell(ours), cell(theirs), f"difference {difference}")]


def time_rows(label: str, ours: list[TimedRun], theirs: list[TimedRun] | None) -> list[tuple[str, str, str, str]]:
    """Wall and CPU seconds of one step (summed over the runs it takes), with the ratio ours / llama.cpp's."""
    rows = []
    for kind, seconds in (("wall", lambda timed: timed.run.wall_s), ("CPU", lambda timed: timed.cpu_s)):
        ours_s = sum(seconds(timed) for timed in ours)
        theirs_s = sum(seconds(timed) for timed in theirs) if theirs else None
        rows.append((f"{label}: {kind} s", f"{ours_s:.1f}", f"{theirs_s:.1f}" if theirs_s else "-",
                     f"ratio {ours_s / theirs_s:.2f}x" if theirs_s else "-"))
    return rows


def rss_row(label: str, ours: TimedRun, theirs: TimedRun | None) -> tuple[str, str, str, str]:
    return label, f"{ours.run.peak_rss_mib:.0f}", f"{theirs.run.peak_rss_mib:.0f}" if theirs else "-", ""


def markdown_table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| measurement | ewq-gguf | llama-perplexity | |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
