"""The base model's scores of a text, computed once and kept on disk for every later comparison.

One folder per base file (named by a digest of its absolute path) holds numpy arrays, opened as memory maps so a
comparison reads one chunk at a time whatever the text length:
  tokens.npy  int32   [chunks, ctx]             the evaluated tokens (candidates reuse them: no second tokenization)
  codes.npy   uint16  [chunks, scored, vocab]   compact log-probabilities (see scoring.py)
  grid.npy    float32 [chunks, scored, 2]       per token: low and step of the code grid
  top1.npy    int32   [chunks, scored]          the base's most likely token
  nll.npy     float64 [chunks, scored]          the base's -log p(next token)
  meta.json   what they were computed from; written last, so a folder without it is an unfinished build.
The entry is reused while the base file (size, mtime, header digest), the text digest, ctx and vocabulary are unchanged
and it holds at least the chunks asked for; otherwise it is rebuilt in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ewq_gguf.errors import OutputError
from ewq_gguf.gguf_file import GgufFile
from ewq_gguf.progress import progress_bar
from ewq_gguf.text import EvalText
from ewq_gguf.validate.evaluator import ChunkEvaluator, ChunkLayout
from ewq_gguf.validate.scoring import BaseScores, EncodedLogProbs, score_base

CACHE_FORMAT = 1
_ARRAY_NAMES = ("tokens", "codes", "grid", "top1", "nll")


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ewq-gguf" / "base-logits"


def cache_key(base: GgufFile, text: EvalText, n_ctx: int) -> dict:
    """Everything the cached scores depend on; any difference invalidates the entry."""
    stat = base.path.stat()
    return {
        "format": CACHE_FORMAT,
        "base_size": stat.st_size,
        "base_mtime_ns": stat.st_mtime_ns,
        "base_header_sha256": base.header_sha256,
        "vocab_sha256": base.vocab_sha256,
        "text_sha256": text.sha256,
        "ctx": n_ctx,
    }


@dataclass
class BaseLogits:
    """A usable cache entry: the first `n_chunks` chunks of the base's scores."""

    directory: Path
    n_chunks: int
    tokens: np.ndarray
    codes: np.ndarray
    grid: np.ndarray
    top1: np.ndarray
    nll: np.ndarray
    reused: bool

    def chunk_base(self, index: int) -> EncodedLogProbs:
        grid = np.asarray(self.grid[index])
        return EncodedLogProbs(codes=np.asarray(self.codes[index]), low=grid[:, 0].copy(), step=grid[:, 1].copy())


def entry_directory(cache_dir: Path, base: GgufFile) -> Path:
    return cache_dir / hashlib.sha256(str(base.path.resolve()).encode()).hexdigest()[:24]


def _open_entry(directory: Path, key: dict, chunks: int | None) -> BaseLogits | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    wanted = meta["chunks_available"] if chunks is None else min(chunks, meta["chunks_available"])
    if meta["chunks"] < wanted:
        return None
    try:
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAY_NAMES}
    except (OSError, ValueError):
        return None
    if any(len(array) != meta["chunks"] for array in arrays.values()):
        return None
    return BaseLogits(directory=directory, n_chunks=wanted, reused=True, **arrays)


def _check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputError(
            f"{directory}: the base logits need {needed / 2**30:.1f} GiB and only {free / 2**30:.1f} GiB is free; "
            "use --chunks to score fewer chunks or another cache folder"
        )


def base_logits(
    base: GgufFile,
    text: EvalText,
    n_ctx: int,
    chunks: int | None,
    cache_dir: Path | None = None,
    gpu_layers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> BaseLogits:
    """The cached base scores for (base, text, n_ctx), computed now when the cache lacks them."""
    directory = entry_directory(Path(cache_dir) if cache_dir is not None else default_cache_dir(), base)
    key = cache_key(base, text, n_ctx)
    cached = _open_entry(directory, key, chunks)
    if cached is not None:
        return cached
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "meta.json").unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{directory}: cannot write the logits cache ({exc})") from exc

    started = time.perf_counter()
    layout = ChunkLayout(n_ctx)
    with ChunkEvaluator(base, n_ctx, gpu_layers=gpu_layers, threads=threads) as evaluator, \
            ThreadPoolExecutor(evaluator.threads) as scoring_threads:
        all_tokens = evaluator.chunked_tokens(text, None)
        n_chunks = len(all_tokens) if chunks is None else min(chunks, len(all_tokens))
        shape = (n_chunks, layout.n_scored)
        _check_free_space(directory, n_chunks * layout.n_scored * evaluator.n_vocab * 2)
        tokens = np.lib.format.open_memmap(directory / "tokens.npy", "w+", np.int32, (n_chunks, n_ctx))
        codes = np.lib.format.open_memmap(directory / "codes.npy", "w+", np.uint16, (*shape, evaluator.n_vocab))
        grid = np.lib.format.open_memmap(directory / "grid.npy", "w+", np.float32, (*shape, 2))
        top1 = np.lib.format.open_memmap(directory / "top1.npy", "w+", np.int32, shape)
        nll = np.lib.format.open_memmap(directory / "nll.npy", "w+", np.float64, shape)
        tokens[:] = all_tokens[:n_chunks]
        for index in progress_bar(range(n_chunks), desc=f"base logits {base.path.name}", unit="chunk",
                                  enabled=progress):
            logits = evaluator.chunk_logits(all_tokens[index])
            # Scores go straight into the memory maps; the page cache writes them out, no copy on the way.
            chunk_out = BaseScores(EncodedLogProbs(codes[index], grid[index, :, 0], grid[index, :, 1]),
                                   nll[index], top1[index])
            score_base(logits, all_tokens[index, layout.first + 1:], chunk_out, scoring_threads)
        del tokens, codes, grid, top1, nll
    meta = {
        "key": key,
        "base_path": str(base.path.resolve()),
        "text_source": str(text.source),
        "chunks": n_chunks,
        "chunks_available": len(all_tokens),
        "n_vocab": evaluator.n_vocab,
        "seconds": time.perf_counter() - started,
    }
    temporary = directory / "meta.json.tmp"
    temporary.write_text(json.dumps(meta, indent=1))
    temporary.replace(directory / "meta.json")
    opened = _open_entry(directory, key, chunks)
    opened.reused = False
    return opened
