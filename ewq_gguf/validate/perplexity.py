"""Perplexity of one GGUF file on a text, computed the way llama.cpp's llama-perplexity computes it."""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ewq_gguf.constants import DEFAULT_EVALUATION_CTX
from ewq_gguf.gguf_file import read_gguf
from ewq_gguf.progress import progress_bar
from ewq_gguf.text import load_text
from ewq_gguf.validate.evaluator import ChunkEvaluator, check_chunk_count, check_context_size
from ewq_gguf.validate.scoring import negative_log_likelihoods


@dataclass
class PerplexityReport:
    file: str
    bytes: int
    bpw: float
    ppl: float
    ppl_se: float
    tokens: int  # scored tokens: the second half of every chunk
    seconds: float  # wall time of the whole call: loading, tokenizing, evaluating
    text: str  # where the text came from
    ctx: int
    chunks: int
    evaluated_tokens: int  # chunks x ctx, what llama.cpp processed
    gpu_layers: int
    threads: int

    @property
    def tokens_per_second(self) -> float:
        return self.evaluated_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("file", "bytes", "bpw", "ppl", "ppl_se", "tokens", "seconds")}


def mean_and_standard_error(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, computed as llama-perplexity does (from the sums of x and x^2, n - 1)."""
    count = len(values)
    mean = float(values.mean())
    variance = float(np.mean(np.square(values))) - mean * mean
    return mean, math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0


def perplexity_from_nll(nll: np.ndarray) -> tuple[float, float]:
    """PPL = exp(mean NLL) and its standard error exp(mean) * se(NLL)."""
    mean, standard_error = mean_and_standard_error(nll)
    ppl = math.exp(mean)
    return ppl, ppl * standard_error


def perplexity(
    path: str | Path,
    text: str | Path | None = None,
    ctx: int = DEFAULT_EVALUATION_CTX,
    chunks: int | None = None,
    gpu_layers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> PerplexityReport:
    """Perplexity of the GGUF at `path` on `text` (a file; None: the default text found on this machine).

    The text is tokenized once and cut into chunks of `ctx` tokens (the first `chunks` of them, all when None); each
    chunk starts with BOS when the vocabulary adds BOS, and the tokens of its second half are scored.
    """
    started = time.perf_counter()
    check_context_size(ctx)
    check_chunk_count(chunks)
    gguf = read_gguf(path)
    eval_text = load_text(text)
    with ChunkEvaluator(gguf, ctx, gpu_layers=gpu_layers, threads=threads) as evaluator, \
            ThreadPoolExecutor(evaluator.threads) as scoring_threads:
        chunk_tokens = evaluator.chunked_tokens(eval_text, chunks)
        first = evaluator.layout.first
        nll = np.empty((len(chunk_tokens), evaluator.layout.n_scored), dtype=np.float64)
        for index in progress_bar(range(len(chunk_tokens)), desc=f"perplexity {gguf.path.name}", unit="chunk",
                                  enabled=progress):
            logits = evaluator.chunk_logits(chunk_tokens[index])
            nll[index] = negative_log_likelihoods(logits, chunk_tokens[index, first + 1:], scoring_threads)
    ppl, ppl_se = perplexity_from_nll(nll.ravel())
    return PerplexityReport(
        file=str(gguf.path),
        bytes=gguf.file_size,
        bpw=gguf.bits_per_weight,
        ppl=ppl,
        ppl_se=ppl_se,
        tokens=nll.size,
        seconds=time.perf_counter() - started,
        text=str(eval_text.source),
        ctx=ctx,
        chunks=len(chunk_tokens),
        evaluated_tokens=chunk_tokens.size,
        gpu_layers=evaluator.gpu_layers,
        threads=evaluator.threads,
    )


def format_perplexity(report: PerplexityReport) -> str:
    """Two lines for people: the text used, then the result with its sample size and speed."""
    return (
        f"text: {report.text}\n"
        f"{Path(report.file).name}: PPL = {report.ppl:.4f} +/- {report.ppl_se:.4f} over {report.tokens} scored tokens "
        f"({report.chunks} chunks x {report.ctx}; {report.threads} threads, {report.gpu_layers} GPU layers), "
        f"{report.evaluated_tokens} tokens in {report.seconds:.1f} s = {report.tokens_per_second:.1f} tokens/s"
    )
