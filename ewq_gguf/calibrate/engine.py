"""CALIBRATE: run the checkpoint on real text once and measure what the calibration-driven plans need.

1. Activations, streamed over `tokens` tokens in chunks of `ctx` (decoder only; the head's input is the decoder's
   output): per block, LIM = -mean over tokens of cos(block input, block output); per weight, the sum of squared
   input activations per column and the token count (llama.cpp's imatrix: importance = sum / count). Weights whose
   rows are permuted for llama.cpp (Q and K) keep their input columns, so the same vector serves them.
2. Sensitivities: noise injection into each weight on `sensitivity_tokens` tokens (sensitivity.py).
3. Optionally the relative quantization error of each weight in each candidate type, without and with the
   importance vectors (quant_error.py), so that later plans of any size need no quantization at all.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import InputError
from ..imatrix import ImportanceMatrix
from ..progress import progress_bar
from ..quant import CODECS, QType
from ..source.model import SourceModel, open_checkpoint
from .calibration import Calibration, model_fingerprint
from .quant_error import DEFAULT_SAMPLE, error_table
from .runner import ModelRunner, calibration_tokens
from .sensitivity import DEFAULT_NOISE_LEVELS, measure_sensitivities

DEFAULT_TOKENS = 32768
DEFAULT_CTX = 512
DEFAULT_SENSITIVITY_TOKENS = 128
# sensitivity sequences are short: every position counts as a sample, and attention over 128 tokens is cheap
SENSITIVITY_SEQUENCE = 128


def calibrate(model_dir: str | Path, text: Optional[str | Path] = None, *, tokens: int = DEFAULT_TOKENS,
              ctx: int = DEFAULT_CTX, device: str = "auto", sensitivity_tokens: int = DEFAULT_SENSITIVITY_TOKENS,
              noise_levels: Sequence[float] = DEFAULT_NOISE_LEVELS, error_types: Sequence[QType] = tuple(CODECS),
              error_sample: int = DEFAULT_SAMPLE, threads: Optional[int] = None,
              progress: bool = True) -> Calibration:
    """Measure LIM scores, importance vectors and sensitivities of the checkpoint in `model_dir` on `text`
    (default: real English text found on this machine), and the quantization error tables of `error_types`
    (every type we encode by default; empty: none, the optimal planner then measures them when it plans).

    threads: CPU threads for torch (default: torch's choice). On a CPU shared with other work, fewer threads than
    cores can be several times faster: torch's threads wait for each other at every operation."""
    from ..validate.text import load_text

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
    runner = ModelRunner(model_dir, source, torch_device)
    chunks = calibration_tokens(runner.tokenizer, calibration_text.content, tokens, ctx)
    seconds["load"] = time.perf_counter() - started

    started = time.perf_counter()
    imatrix = ImportanceMatrix(datasets=[str(calibration_text.source)], chunk_count=int(chunks.shape[0]),
                               chunk_size=int(chunks.shape[1]))
    cos_sums = np.zeros(runner.n_blocks)
    cos_counts = np.zeros(runner.n_blocks)
    head_name = runner.head_weight_name()

    def on_linear_input(name: str, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        imatrix.add(name, flat.pow(2).sum(0).double().cpu().numpy(), flat.shape[0])

    def on_block(index: int, block_in: torch.Tensor, block_out: torch.Tensor) -> None:
        cosine = F.cosine_similarity(block_in.float(), block_out.float().to(block_in.device), dim=-1)
        cos_sums[index] += float(cosine.double().sum())
        cos_counts[index] += cosine.numel()

    def on_head_input(hidden: torch.Tensor) -> None:
        if head_name is not None:
            on_linear_input(head_name, hidden)

    runner.collect(chunks, on_linear_input, on_block, on_head_input,
                   lambda items: progress_bar(items, desc="activations", unit="chunk", enabled=progress))
    lim = [float(-total / count) for total, count in zip(cos_sums, cos_counts)]
    seconds["activations"] = time.perf_counter() - started

    started = time.perf_counter()
    vectors = imatrix.vectors()
    sequence = min(SENSITIVITY_SEQUENCE, chunks.shape[1])
    n_sequences = min(chunks.shape[0], max(1, -(-sensitivity_tokens // sequence)))
    ids = chunks[:n_sequences, :sequence]
    sensitivity = measure_sensitivities(runner, ids, list(noise_levels), vectors.get, progress=progress)
    seconds["sensitivity"] = time.perf_counter() - started

    calibration = Calibration(
        model=source.name, fingerprint=model_fingerprint(source), n_blocks=source.n_blocks,
        text=str(calibration_text.source), text_sha256=calibration_text.sha256, tokens=int(chunks.numel()),
        ctx=int(chunks.shape[1]), device=str(torch_device), lim=lim, sensitivity=sensitivity,
        sensitivity_tokens=int(ids.numel()), noise_levels=[float(level) for level in noise_levels],
        seconds=seconds, imatrix=imatrix)
    del runner
    if error_types:
        started = time.perf_counter()
        add_error_tables(calibration, source, error_types, error_sample, torch_device, progress)
        seconds["errors"] = time.perf_counter() - started
    return calibration


def add_error_tables(calibration: Calibration, source: SourceModel, types: Sequence[QType], sample: int, device: torch.device,
                     progress: bool) -> None:
    """Fill calibration.errors for `types`: "plain" quantization and quantization with its own importance vectors."""
    vectors = calibration.imatrix.vectors()
    specs = [spec for spec in source.specs if spec.is_matrix and spec.name in calibration.sensitivity]
    calibration.error_sample = sample
    calibration.errors["plain"] = error_table(source, specs, types, lambda name: None, vectors.get, sample=sample,
                                              device=device, progress=progress)
    calibration.errors["imatrix"] = error_table(source, specs, types, vectors.get, vectors.get, sample=sample,
                                                device=device, progress=progress)
