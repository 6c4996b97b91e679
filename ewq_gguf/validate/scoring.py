"""Per-token scores from a chunk's logits: negative log-likelihood, the compact base log-probabilities, KL, top-1.

Everything works on blocks of rows so temporaries stay in cache and memory stays bounded for any vocabulary size;
no Python loop runs per token. Given an executor, blocks run on its threads (numpy releases the GIL), the way
llama-perplexity spreads its log-softmax over worker threads.

The compact form of the base distribution follows the idea of llama-perplexity's --kl-divergence-base file: per token,
log-probabilities within 16 nats of the most likely token are stored as uint16 on a uniform grid (low + step * code),
the rest as code 0 at `low`. Unlike that file, the candidate's log-probabilities are rounded onto the same per-token
grid before they are compared, so both sides carry the same rounding: a file compared with itself gives exactly 0, and
for different files the rounding changes the mean KL by far less than its standard error.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

LOG_PROB_RANGE = 16.0  # nats below the most likely token that the grid covers (llama-perplexity uses the same)
LOG_PROB_FLOOR = -16.0  # base tokens at or below this log-probability do not enter the KL sum (as in llama-perplexity)
CODE_MAX = 65535
ROW_BLOCK = 16


def _for_row_blocks(n_rows: int, work: Callable[[slice], None], executor: Executor | None) -> None:
    blocks = [slice(start, start + ROW_BLOCK) for start in range(0, n_rows, ROW_BLOCK)]
    if executor is None:
        for block in blocks:
            work(block)
    else:
        for _ in executor.map(work, blocks):
            pass


def log_normalizers(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) per row, float64, computed stably (max subtracted, float64 accumulation)."""
    maxima = logits.max(axis=1)
    shifted = logits - maxima[:, None]
    np.exp(shifted, out=shifted)
    return maxima.astype(np.float64) + np.log(shifted.sum(axis=1, dtype=np.float64))


def negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray, executor: Executor | None = None) -> np.ndarray:
    """-log p(target) per row, float64."""
    nll = np.empty(len(targets), dtype=np.float64)

    def work(block: slice) -> None:
        rows = logits[block]
        nll[block] = log_normalizers(rows) - rows[np.arange(len(rows)), targets[block]]

    _for_row_blocks(len(targets), work, executor)
    return nll


@dataclass
class EncodedLogProbs:
    """A block of base rows in compact form: log p[i, v] ~= low[i] + step[i] * codes[i, v]."""

    codes: np.ndarray  # uint16 [rows, vocab]
    low: np.ndarray  # float32 [rows]
    step: np.ndarray  # float32 [rows]


def _grid_positions(log_probs: np.ndarray, low: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Nearest grid index of every log-probability (float32, not clipped); the one rounding both sides share."""
    inverse_step = np.divide(1.0, step, out=np.zeros_like(step), where=step > 0)
    positions = log_probs - low[:, None]
    positions *= inverse_step[:, None]
    return np.rint(positions, out=positions)


@dataclass
class BaseScores:
    """What the cache keeps of the base's rows: compact log-probabilities, -log p(target) and the top token."""

    log_probs: EncodedLogProbs
    nll: np.ndarray  # float64 [rows]
    top1: np.ndarray  # int [rows]


def score_base(logits: np.ndarray, targets: np.ndarray, out: BaseScores, executor: Executor | None = None) -> None:
    """Fill `out` (preallocated, possibly views into the cache's memory maps) from the base's logits."""
    encoded = out.log_probs

    def work(block: slice) -> None:
        rows = logits[block]
        normalizers = log_normalizers(rows)
        out.nll[block] = normalizers - rows[np.arange(len(rows)), targets[block]]
        out.top1[block] = rows.argmax(axis=1)
        log_probs = rows - normalizers.astype(np.float32)[:, None]
        high = log_probs.max(axis=1)
        low = np.maximum(log_probs.min(axis=1), high - np.float32(LOG_PROB_RANGE))
        step = (high - low) / np.float32(CODE_MAX)
        positions = _grid_positions(log_probs, low, step)
        np.clip(positions, 0, CODE_MAX, out=positions)
        encoded.codes[block] = positions
        encoded.low[block] = low
        encoded.step[block] = step

    _for_row_blocks(len(logits), work, executor)


@dataclass
class CandidateScores:
    nll: np.ndarray  # float64 [rows]: -log q(target)
    kld: np.ndarray  # float64 [rows]: KL(base || candidate)
    same_top1: np.ndarray  # bool [rows]: the candidate's most likely token is the base's


def score_against_base(
    logits: np.ndarray, targets: np.ndarray, base: EncodedLogProbs, base_top1: np.ndarray,
    executor: Executor | None = None,
) -> CandidateScores:
    """Compare a candidate's logits with the base's compact log-probabilities, row by row."""
    n_rows = len(targets)
    scores = CandidateScores(
        nll=np.empty(n_rows, dtype=np.float64),
        kld=np.empty(n_rows, dtype=np.float64),
        same_top1=np.empty(n_rows, dtype=bool),
    )

    def work(block: slice) -> None:
        rows = logits[block]
        normalizers = log_normalizers(rows)
        scores.nll[block] = normalizers - rows[np.arange(len(rows)), targets[block]]
        scores.same_top1[block] = rows.argmax(axis=1) == base_top1[block]
        low, step = base.low[block], base.step[block]
        codes = base.codes[block]
        # log p - log q = step * (code_base - code_candidate) once both lie on the base token's grid.
        code_difference = _grid_positions(rows - normalizers.astype(np.float32)[:, None], low, step)
        np.subtract(codes, code_difference, out=code_difference)
        base_probs = codes * step[:, None]
        base_probs += low[:, None]
        counted = base_probs > np.float32(LOG_PROB_FLOOR)
        np.exp(base_probs, out=base_probs)
        base_probs *= counted
        base_probs *= code_difference
        scores.kld[block] = step.astype(np.float64) * base_probs.sum(axis=1, dtype=np.float64)

    _for_row_blocks(n_rows, work, executor)
    return scores
