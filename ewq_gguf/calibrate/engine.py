"""CALIBRATE: run the checkpoint on real text once and measure what the calibration-driven plans need.

The model is streamed block by block (stream.py, passes.py): memory holds the weights outside the blocks, one
block, and one chunk of hidden states at a time, whatever the model's depth; what passes between blocks lives in a
work folder beside the output, from which an interrupted run resumes (workfolder.py).

1. Activations over `tokens` tokens in chunks of `ctx`: per block, LIM = -mean over tokens of cos(block input, block
   output); per weight, the sum of squared input activations per column and the token count (llama.cpp's imatrix:
   importance = sum / count). Weights whose rows are permuted for llama.cpp (Q and K) keep their input columns, so
   the same vector serves them.
2. Sensitivities (the linearity theorem's alpha), by default from the Fisher information of the model's output,
   one backward pass per chunk over `sensitivity_tokens` tokens (passes.py); or, with sensitivity="noise", by noise
   injection into each weight of the whole model in memory (sensitivity.py), the reference the Fisher estimate is
   checked against. Either way on chunks spread evenly over the text, not its first ones: a text's start (a title
   page, a table of contents) is rarely like the rest of it.
3. Optionally the relative quantization error of each weight in each candidate type, without and with the
   importance vectors (quant_error.py), so that later plans of any size need no quantization at all.
"""
from __future__ import annotations

import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..constants import (COMPUTE_DTYPES, DEFAULT_CALIBRATION_CTX, DEFAULT_CALIBRATION_TOKENS, DEFAULT_NOISE_LEVELS,
                         DEFAULT_SENSITIVITY_METHOD, DEFAULT_SENSITIVITY_TOKENS, NOISE_SEQUENCE,
                         SENSITIVITY_METHODS)
from ..device import resolve_device
from ..errors import InputError
from .imatrix import ImportanceMatrix
from ..progress import progress_bar
from ..quant import CODECS, QType
from ..source.model import SourceModel, open_checkpoint
from .calibration import CALIBRATION_FORMAT, Calibration, Sensitivity, model_fingerprint
from .passes import BlockPasses, chunk_alphas
from .quant_error import DEFAULT_SAMPLE, error_tables
from .runner import ModelRunner, calibration_tokens
from .sensitivity import measure_sensitivities
from .stream import StreamedModel
from .workfolder import WorkFolder

# torch's dtype of each compute dtype name; None: chosen by the checkpoint and the machine (stream.py)
TORCH_COMPUTE_DTYPES = {name: None if name == "auto" else getattr(torch, name) for name in COMPUTE_DTYPES}


class CalibrationWarning(UserWarning):
    """The calibration measures less than was asked for (a text shorter than --tokens)."""


def calibrate(model_dir: str | Path, text: Optional[str | Path] = None, *, tokens: int = DEFAULT_CALIBRATION_TOKENS,
              ctx: int = DEFAULT_CALIBRATION_CTX, device: str = "auto", sensitivity: str = DEFAULT_SENSITIVITY_METHOD,
              sensitivity_tokens: Optional[int] = None, noise_levels: Sequence[float] = DEFAULT_NOISE_LEVELS,
              error_types: Sequence[QType] = tuple(CODECS), error_sample: int = DEFAULT_SAMPLE,
              threads: Optional[int] = None, work_dir: Optional[str | Path] = None, seed: int = 0,
              compute_dtype: str = "auto", progress: bool = True) -> Calibration:
    """Measure LIM scores, importance vectors and sensitivities of the checkpoint in `model_dir` on `text`
    (default: real English text found on this machine), and the quantization error tables of `error_types`
    (every type we encode by default; empty: none, the optimal planner then measures them when it plans).

    sensitivity: "fisher" (gradients, streamed) or "noise" (noise injection, whole model in memory).
    work_dir: where the passes keep their files; a later call with the same work_dir and arguments resumes an
    interrupted run there (default: a temporary folder, removed at the end). The caller removes it once the result
    is saved. threads: CPU threads for torch (default: torch's choice); on a CPU shared with other work, fewer
    threads than cores can be several times faster. compute_dtype: the blocks' arithmetic, "float32", "bfloat16" or
    "auto" (bfloat16 for a bfloat16 checkpoint where bfloat16 is fast, see stream.py)."""
    from ..text import load_text

    if sensitivity not in SENSITIVITY_METHODS:
        raise InputError(f"unknown sensitivity method '{sensitivity}' (one of {', '.join(SENSITIVITY_METHODS)})")
    if compute_dtype not in COMPUTE_DTYPES:
        raise InputError(f"unknown compute dtype '{compute_dtype}' (one of {', '.join(COMPUTE_DTYPES)})")
    if sensitivity_tokens is None:
        sensitivity_tokens = DEFAULT_SENSITIVITY_TOKENS[sensitivity]
    if tokens < 1 or ctx < 8 or sensitivity_tokens < 1:
        raise InputError("--tokens and --sensitivity-tokens must be positive and --ctx at least 8")
    if not noise_levels or any(not 0 < level < 1 for level in noise_levels):
        raise InputError(f"noise levels must lie in (0, 1), got {list(noise_levels)}")
    torch_device = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    source = open_checkpoint(model_dir)
    calibration_text = load_text(text)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model = StreamedModel(model_dir, torch_device, TORCH_COMPUTE_DTYPES[compute_dtype])
    chunks = calibration_tokens(model.tokenizer, calibration_text.content, tokens, ctx)
    if chunks.numel() < tokens:
        warnings.warn(f"calibrating on {chunks.numel()} tokens, fewer than the {tokens} asked for (--tokens): "
                      f"{calibration_text.source} holds only {chunks.shape[0]} chunks of {ctx}", CalibrationWarning,
                      stacklevel=2)
    n_grad = min(int(chunks.shape[0]), -(-sensitivity_tokens // ctx)) if sensitivity == "fisher" else 0
    noise_sequence = min(NOISE_SEQUENCE, int(chunks.shape[1]))
    n_sampled = n_grad if sensitivity == "fisher" else min(int(chunks.shape[0]),
                                                            -(-sensitivity_tokens // noise_sequence))
    # the sampled chunks first: the passes and the noise injection take their sensitivity chunks from the start
    chunks = chunks[spread_first(int(chunks.shape[0]), n_sampled)]
    seconds["load"] = time.perf_counter() - started

    imatrix = ImportanceMatrix(datasets=[str(calibration_text.source)], chunk_count=int(chunks.shape[0]),
                               chunk_size=int(chunks.shape[1]))
    key = {"format": CALIBRATION_FORMAT, "model": model_fingerprint(source), "text": calibration_text.sha256,
           "tokens": int(chunks.numel()), "ctx": int(chunks.shape[1]), "gradient_chunks": n_grad,
           "chunk_order": "spread", "chunk_layout": "llama-imatrix", "seed": seed, "compute_dtype": str(model.compute_dtype)}

    def bar(items, **options):
        return progress_bar(items, enabled=progress, **options)

    with _work_folder(work_dir, key) as work:
        passes = BlockPasses(model, source, chunks, n_grad, work, imatrix, bar, seed=seed)
        model.record_layer_arguments(chunks[:1])
        started = time.perf_counter()
        passes.forward()
        unmeasured = [spec.name for spec in source.specs if spec.is_matrix and len(spec.shape) == 3
                      and spec.name not in imatrix.sums]
        if unmeasured:
            # a mixture-of-experts module whose experts multiply by their weights in a form the importance hooks do
            # not follow (passes._ExpertInputs: slices of the 3-D weights, by F.linear or matmul, transposed or not)
            raise InputError(f"calibration cannot measure the expert weights of {source.adapter.arch_name} "
                             f"({unmeasured[0]}, ...) expert by expert: transformers' module computes them in a way "
                             f"the importance hooks do not follow")
        passes.head()
        seconds["activations"] = time.perf_counter() - started
        lim = passes.lim()
        if sensitivity == "fisher":
            started = time.perf_counter()
            passes.backward()
            passes.embedding()
            sensitivities = {name: _fisher_sensitivity(traces, work.state["norms"][name], int(chunks.shape[1]))
                             for name, traces in work.state["traces"].items()}
            gradient_tokens = n_grad * int(chunks.shape[1])
            row_fisher = {name: (rows / gradient_tokens).tolist() for name, rows in passes.fisher_rows.items()}
            column_fisher = {name: (columns / gradient_tokens).tolist()
                             for name, columns in passes.fisher_columns.items()}
            seconds["sensitivity"] = time.perf_counter() - started
            sensitivity_ids_count = n_grad * int(chunks.shape[1])
    compute_dtype_used = model.compute_dtype
    del model, passes
    if sensitivity == "noise":
        row_fisher, column_fisher = {}, {}
        started = time.perf_counter()
        runner = ModelRunner(model_dir, source, torch_device)
        ids = chunks[:n_sampled, :noise_sequence]
        sensitivities = measure_sensitivities(runner, ids, list(noise_levels), imatrix.vectors().get,
                                              progress=progress)
        sensitivity_ids_count = int(ids.numel())
        del runner
        seconds["sensitivity"] = time.perf_counter() - started

    calibration = Calibration(
        model=source.name, fingerprint=model_fingerprint(source), n_blocks=source.n_blocks,
        text=str(calibration_text.source), text_sha256=calibration_text.sha256, tokens=int(chunks.numel()),
        ctx=int(chunks.shape[1]), device=f"{torch_device} {str(compute_dtype_used).removeprefix('torch.')}", lim=lim, sensitivity=sensitivities,
        sensitivity_tokens=sensitivity_ids_count, sensitivity_method=sensitivity, row_fisher=row_fisher,
        column_fisher=column_fisher,
        noise_levels=[float(level) for level in noise_levels] if sensitivity == "noise" else [],
        seconds=seconds, imatrix=imatrix)
    if error_types:
        started = time.perf_counter()
        add_error_tables(calibration, source, error_types, error_sample, progress)
        seconds["errors"] = time.perf_counter() - started
    return calibration


def spread_first(n_chunks: int, n_sampled: int) -> torch.Tensor:
    """An order of n_chunks chunks that starts with n_sampled of them spread evenly over the text (the middle chunk
    of each of n_sampled equal stretches), then the others in their order."""
    sampled = [(2 * index + 1) * n_chunks // (2 * n_sampled) for index in range(n_sampled)]
    chosen = set(sampled)
    return torch.tensor(sampled + [index for index in range(n_chunks) if index not in chosen], dtype=torch.long)


@contextmanager
def _work_folder(work_dir: Optional[str | Path], key: dict) -> Iterator[WorkFolder]:
    if work_dir is not None:
        yield WorkFolder(Path(work_dir), key)
        return
    with tempfile.TemporaryDirectory(prefix="ewq-calibration-") as temporary:
        yield WorkFolder(Path(temporary) / "work", key)


def _fisher_sensitivity(traces: list[float], norms: list, tokens_per_chunk: int) -> Sensitivity:
    alphas, weighted = chunk_alphas(traces, norms, tokens_per_chunk)
    return Sensitivity(alpha=float(alphas.mean()), alpha_weighted=float(weighted.mean()),
                       samples=alphas.tolist(), samples_weighted=weighted.tolist())


def add_error_tables(calibration: Calibration, source: SourceModel, types: Sequence[QType], sample: int,
                     progress: bool) -> None:
    """Fill calibration.errors for `types`: "plain" quantization and quantization with its own importance vectors."""
    vectors = calibration.imatrix.vectors()
    specs = [spec for spec in source.specs if spec.is_matrix and spec.name in calibration.sensitivity]
    calibration.error_sample = sample
    calibration.errors.update(error_tables(source, specs, types, {"plain": lambda name: None, "imatrix": vectors.get},
                                           calibration.error_weights, sample=sample, progress=progress))
