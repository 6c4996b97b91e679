"""A GGUF loaded into llama.cpp (through llama-cpp-python's low-level API), returning the logits of chunks.

Chunks are scored the way llama.cpp's llama-perplexity scores them: a chunk is n_ctx tokens, its first token is
replaced by BOS when the vocabulary asks for BOS, and only the second half is scored, so logits are requested from
llama.cpp for positions first .. n_ctx-2 only (first = n_ctx // 2): the output head never runs on the first half.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from ewq_gguf.errors import EwqGgufError, InputError
from ewq_gguf.gguf_file import GgufFile
from ewq_gguf.text import EvalText

_LOG_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR in ggml.h
MIN_CONTEXT = 8


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise EwqGgufError(
            "validation needs llama-cpp-python (pip install llama-cpp-python; for a GPU build see its README)"
        ) from exc
    return llama_cpp


def default_gpu_layers() -> int:
    """All layers (-1) when this llama-cpp-python build can offload to a GPU, else none."""
    return -1 if _llama_cpp().llama_supports_gpu_offload() else 0


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _LlamaLogCapture:
    """Keeps llama.cpp's log off the terminal while a model is in use, and its error lines for our error messages."""

    def __init__(self):
        llama_cpp = _llama_cpp()
        self.errors: list[str] = []

        @llama_cpp.llama_log_callback
        def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == _LOG_LEVEL_ERROR:
                self.errors.append(text.decode("utf-8", errors="replace").strip())

        self._callback = collect
        self._previous_callback = llama_cpp.llama_log_callback()
        self._previous_user_data = ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(self._previous_callback), ctypes.byref(self._previous_user_data))
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def restore(self) -> None:
        _llama_cpp().llama_log_set(self._previous_callback, self._previous_user_data)

    def reason(self) -> str:
        return " ".join(line for line in self.errors if line) or "no reason given"


@dataclass(frozen=True)
class ChunkLayout:
    """Which positions of a chunk are scored: logits rows first .. n_ctx-2 predict tokens first+1 .. n_ctx-1."""

    n_ctx: int

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def n_scored(self) -> int:
        return self.n_ctx - 1 - self.first


def check_context_size(n_ctx: int) -> None:
    if n_ctx < MIN_CONTEXT:
        raise InputError(f"--ctx {n_ctx} is too small: only the second half of each chunk is scored; "
                         f"use at least {MIN_CONTEXT}")


def check_chunk_count(chunks: int | None) -> None:
    if chunks is not None and chunks < 1:
        raise InputError(f"--chunks {chunks}: give at least 1 (or leave it out to use the whole text)")


class ChunkEvaluator:
    """One model in llama.cpp with a context of n_ctx tokens; use as a context manager so its memory is freed."""

    def __init__(self, gguf: GgufFile, n_ctx: int, gpu_layers: int | None = None, threads: int | None = None):
        check_context_size(n_ctx)
        self._llama_cpp = llama_cpp = _llama_cpp()
        self.layout = ChunkLayout(n_ctx)
        self._model = self._context = self._batch = self._log = None
        llama_cpp.llama_backend_init()

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = default_gpu_layers() if gpu_layers is None else gpu_layers
        self._log = _LlamaLogCapture()
        self._model = llama_cpp.llama_model_load_from_file(str(gguf.path).encode(), model_params)
        if not self._model:
            reason = self._log.reason()
            self.close()
            raise InputError(f"{gguf.path}: llama.cpp cannot load it: {reason}")
        threads = threads or default_threads()
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = n_ctx
        context_params.n_batch = n_ctx
        context_params.n_ubatch = min(n_ctx, context_params.n_ubatch)
        context_params.n_seq_max = 1
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        context_params.no_perf = True
        self._context = llama_cpp.llama_init_from_model(self._model, context_params)
        if not self._context:
            reason = self._log.reason()
            self.close()
            raise EwqGgufError(f"{gguf.path}: llama.cpp cannot create a context: {reason}")

        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.gpu_layers = model_params.n_gpu_layers
        self.threads = threads

        # One batch reused for every chunk: positions, sequence ids and output flags never change, only tokens do.
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._batch.n_tokens = n_ctx
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(n_ctx,))
        np.ctypeslib.as_array(self._batch.pos, shape=(n_ctx,))[:] = np.arange(n_ctx, dtype=np.int32)
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_ctx,))[:] = 1
        for position in range(n_ctx):
            self._batch.seq_id[position][0] = 0
        wants_logits = np.zeros(n_ctx, dtype=np.int8)
        wants_logits[self.layout.first:n_ctx - 1] = 1
        np.ctypeslib.as_array(self._batch.logits, shape=(n_ctx,))[:] = wants_logits

    def tokenize(self, text: str) -> np.ndarray:
        """The whole text as llama-perplexity tokenizes it: special tokens added per the vocabulary, not parsed."""
        encoded = text.encode("utf-8")
        capacity = len(encoded) + 8
        buffer = (self._llama_cpp.llama_token * capacity)()
        count = self._llama_cpp.llama_tokenize(self._vocab, encoded, len(encoded), buffer, capacity, True, False)
        if count < 0:
            raise EwqGgufError(f"tokenizer needs {-count} tokens for {len(encoded)} bytes")
        return np.ctypeslib.as_array(buffer)[:count].copy()

    def chunked_tokens(self, text: EvalText, chunks: int | None) -> np.ndarray:
        """Tokens [n_chunks, n_ctx] of `text`: the first `chunks` chunks (all when None) of the whole tokenization."""
        n_ctx = self.layout.n_ctx
        tokens = self.tokenize(text.content)
        if len(tokens) < 2 * n_ctx:
            raise InputError(
                f"{text.source}: the text is {len(tokens)} tokens long; a context of {n_ctx} needs at least "
                f"{2 * n_ctx} (2 x ctx): give a longer --text or a smaller --ctx"
            )
        n_chunks = len(tokens) // n_ctx if chunks is None else min(chunks, len(tokens) // n_ctx)
        return tokens[: n_chunks * n_ctx].reshape(n_chunks, n_ctx)

    def chunk_logits(self, chunk_tokens: np.ndarray) -> np.ndarray:
        """Logits [n_scored, n_vocab] (float32, a view into llama.cpp's buffer valid until the next call)."""
        llama_cpp = self._llama_cpp
        self._tokens[:] = chunk_tokens
        if self.add_bos:
            self._tokens[0] = self.bos
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._context), True)
        status = llama_cpp.llama_decode(self._context, self._batch)
        if status != 0:
            raise EwqGgufError(f"llama_decode failed with status {status}: {self._log.reason()}")
        pointer = llama_cpp.llama_get_logits(self._context)
        return np.ctypeslib.as_array(pointer, shape=(self.layout.n_scored, self.n_vocab))

    def close(self) -> None:
        llama_cpp = self._llama_cpp
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._context:
            llama_cpp.llama_free(self._context)
            self._context = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
        if self._log is not None:
            self._log.restore()
            self._log = None

    def __enter__(self) -> ChunkEvaluator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
