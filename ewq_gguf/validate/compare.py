"""KL divergence, top-1 agreement and perplexity of candidate GGUF files against a base GGUF, on the same tokens."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ewq_gguf.constants import DEFAULT_EVALUATION_CTX
from ewq_gguf.errors import EwqGgufError, InputError, OutputError
from ewq_gguf.gguf_file import GgufFile, read_gguf
from ewq_gguf.progress import progress_bar
from ewq_gguf.text import load_text
from ewq_gguf.validate.evaluator import ChunkEvaluator, ChunkLayout, check_chunk_count, check_context_size
from ewq_gguf.validate.logits_cache import BaseLogits, base_logits
from ewq_gguf.validate.perplexity import mean_and_standard_error, perplexity_from_nll
from ewq_gguf.validate.scoring import score_against_base

JSON_KEYS = ("file", "bytes", "bpw", "ppl", "ppl_se", "kld", "kld_se", "kld_p99", "top1", "tokens", "seconds")


@dataclass
class CompareReport:
    file: str
    bytes: int
    bpw: float
    ppl: float
    ppl_se: float
    kld: float  # mean KL(base || this file) per scored token, nats
    kld_se: float
    kld_p99: float  # 99th percentile of the per-token KL
    top1: float  # share of scored tokens whose most likely next token is the base's
    tokens: int
    seconds: float  # wall time spent on this file (for the base: building or opening the logits cache)
    is_base: bool
    text: str
    ctx: int
    chunks: int

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in JSON_KEYS}


def _report(gguf: GgufFile, nll: np.ndarray, kld: np.ndarray | None, same_top1: np.ndarray | None,
            seconds: float, text: str, layout: ChunkLayout, chunks: int) -> CompareReport:
    ppl, ppl_se = perplexity_from_nll(nll)
    if kld is None:
        kld_mean = kld_se = kld_p99 = 0.0
        top1 = 1.0
    else:
        kld_mean, kld_se = mean_and_standard_error(kld)
        kld_p99 = float(np.percentile(kld, 99))
        top1 = float(same_top1.mean())
    return CompareReport(
        file=str(gguf.path), bytes=gguf.file_size, bpw=gguf.bits_per_weight, ppl=ppl, ppl_se=ppl_se, kld=kld_mean,
        kld_se=kld_se, kld_p99=kld_p99, top1=top1, tokens=nll.size, seconds=seconds, is_base=kld is None,
        text=text, ctx=layout.n_ctx, chunks=chunks,
    )


def _check_same_vocabulary(base: GgufFile, candidate: GgufFile) -> None:
    if candidate.vocab_sha256 != base.vocab_sha256:
        raise InputError(
            f"{candidate.path}: its vocabulary ({len(candidate.tokens)} tokens) is not the vocabulary of the base "
            f"{base.path} ({len(base.tokens)} tokens); KL divergence needs the same tokenizer"
        )


def _score_candidate(candidate: GgufFile, cache: BaseLogits, layout: ChunkLayout, gpu_layers: int | None,
                     threads: int | None, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (cache.n_chunks, layout.n_scored)
    nll, kld, same_top1 = np.empty(shape), np.empty(shape), np.empty(shape, dtype=bool)
    with ChunkEvaluator(candidate, layout.n_ctx, gpu_layers=gpu_layers, threads=threads) as evaluator, \
            ThreadPoolExecutor(evaluator.threads) as scoring_threads:
        if evaluator.n_vocab != cache.codes.shape[-1]:
            raise InputError(f"{candidate.path}: {evaluator.n_vocab} tokens in its vocabulary, the base has "
                             f"{cache.codes.shape[-1]}")
        for index in progress_bar(range(cache.n_chunks), desc=f"compare {candidate.path.name}", unit="chunk",
                                  enabled=progress):
            tokens = np.asarray(cache.tokens[index])
            logits = evaluator.chunk_logits(tokens)
            scores = score_against_base(logits, tokens[layout.first + 1:], cache.chunk_base(index),
                                        np.asarray(cache.top1[index]), scoring_threads)
            nll[index], kld[index], same_top1[index] = scores.nll, scores.kld, scores.same_top1
    return nll.ravel(), kld.ravel(), same_top1.ravel()


def compare(
    base: str | Path,
    candidates: list[str | Path],
    text: str | Path | None = None,
    ctx: int = DEFAULT_EVALUATION_CTX,
    chunks: int | None = None,
    gpu_layers: int | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> list[CompareReport]:
    """Score each candidate against `base` on the same chunks of `text` (see perplexity() for the chunking).

    The base's log-probabilities are computed once per (base file, text, ctx) and cached under `cache_dir`
    (default: ~/.cache/ewq-gguf/base-logits). Returns one report per file, the base first (its KL is 0 and its
    top-1 agreement 1 by definition), then the candidates in the order given.
    """
    check_context_size(ctx)
    check_chunk_count(chunks)
    if not candidates:
        raise InputError("compare needs at least one candidate GGUF besides the base")
    base_gguf = read_gguf(base)
    candidate_ggufs = [read_gguf(candidate) for candidate in candidates]
    for candidate in candidate_ggufs:
        _check_same_vocabulary(base_gguf, candidate)
    eval_text = load_text(text)
    layout = ChunkLayout(ctx)

    started = time.perf_counter()
    cache = base_logits(base_gguf, eval_text, ctx, chunks, cache_dir=cache_dir, gpu_layers=gpu_layers,
                        threads=threads, progress=progress)
    base_nll = np.asarray(cache.nll[: cache.n_chunks]).ravel()
    reports = [_report(base_gguf, base_nll, None, None, time.perf_counter() - started, str(eval_text.source),
                       layout, cache.n_chunks)]
    for candidate in candidate_ggufs:
        started = time.perf_counter()
        nll, kld, same_top1 = _score_candidate(candidate, cache, layout, gpu_layers, threads, progress)
        reports.append(_report(candidate, nll, kld, same_top1, time.perf_counter() - started,
                               str(eval_text.source), layout, cache.n_chunks))
    return reports


def format_compare_table(reports: list[CompareReport]) -> str:
    """A plain-text table, one row per file."""
    header = ("file", "MiB", "bpw", "PPL", "+/-", "KLD", "+/-", "KLD p99", "top-1 %", "s")
    rows = [
        (
            Path(report.file).name + (" (base)" if report.is_base else ""),
            f"{report.bytes / 2**20:.1f}",
            f"{report.bpw:.3f}",
            f"{report.ppl:.4f}",
            f"{report.ppl_se:.4f}",
            f"{report.kld:.6f}",
            f"{report.kld_se:.6f}",
            f"{report.kld_p99:.5f}",
            f"{100 * report.top1:.2f}",
            f"{report.seconds:.1f}",
        )
        for report in reports
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def require_matplotlib():
    """matplotlib's pyplot on a file-only backend; checked before a long comparison whose plot is wanted."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EwqGgufError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from exc
    return plt


def plot_size_vs_kld(reports: list[CompareReport], path: str | Path) -> Path:
    """Save a PNG of mean KLD (with its standard error) against file size, one labelled point per candidate."""
    plt = require_matplotlib()
    candidates = [report for report in reports if not report.is_base]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    sizes = [report.bytes / 2**20 for report in candidates]
    axes.errorbar(sizes, [report.kld for report in candidates], yerr=[report.kld_se for report in candidates],
                  fmt="o", capsize=3)
    for report, size in zip(candidates, sizes):
        axes.annotate(Path(report.file).stem, (size, report.kld), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    if all(report.kld > 0 for report in candidates):
        axes.set_yscale("log")
    base = next((report for report in reports if report.is_base), None)
    axes.set_xlabel("file size (MiB)")
    axes.set_ylabel("mean KL divergence to the base (nats)")
    title_base = f" to {Path(base.file).name}" if base else ""
    axes.set_title(f"KLD{title_base} vs file size, {candidates[0].chunks} x {candidates[0].ctx} tokens"
                   if candidates else f"KLD{title_base} vs file size")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the plot ({exc})") from exc
    finally:
        plt.close(figure)
    return path

