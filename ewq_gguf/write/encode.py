"""Tensors to GGUF bytes for the writer: read from the model, checked finite, quantized a bounded chunk at a time.

Reading and quantizing run on a background thread, one tensor ahead of the one being written, so that disk and
encoder work at once while memory holds a few tensors, whatever the size of the checkpoint.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from ..errors import InputError
from ..plan import Plan
from ..quant import quantize, row_nbytes
from ..source.model import SourceModel
from ..timing import StageTimes

# Rows quantized per step: bounds the float32 working copy (~64 MiB) whatever the tensor size.
CHUNK_ELEMENTS = 1 << 24


def encode_tensor(tensor: torch.Tensor, qtype: QType, name: str, device: torch.device,
                  importance: Optional[torch.Tensor] = None) -> np.ndarray:
    """A tensor's bytes in qtype, quantized on `device` a bounded chunk of rows at a time into one output buffer.

    importance: one vector, or for stacked experts one per expert end to end (llama-imatrix's n_mat vectors), each
    expert's rows quantized with its own as llama-quantize does."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    vectors = importance.reshape(-1, rows.shape[1]) if importance is not None else None
    if vectors is not None and vectors.shape[0] > 1 and vectors.shape[0] * tensor.shape[-2] != rows.shape[0]:
        raise InputError(f"the importance matrix holds {vectors.shape[0]} vectors for '{name}', which stacks "
                         f"{rows.shape[0] // tensor.shape[-2]} matrices")
    rows_per_vector = tensor.shape[-2] if vectors is not None and vectors.shape[0] > 1 else rows.shape[0]
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    encoded = np.empty((rows.shape[0], row_nbytes(qtype, rows.shape[1])), dtype=np.uint8)
    for first in range(0, rows.shape[0], rows_per_vector):
        vector = vectors[first // rows_per_vector] if vectors is not None else None
        for start in range(first, first + rows_per_vector, step):
            end = min(start + step, first + rows_per_vector)
            chunk = rows[start:end].to(device=device, non_blocking=True)
            if not bool(torch.isfinite(chunk).all()):
                raise InputError(f"tensor '{name}' contains NaN or Inf values; refusing to write it")
            encoded[start:end] = quantize(chunk, qtype, vector).cpu().numpy()
    return encoded


def encoded_tensors(model: SourceModel, plan: Plan, device: torch.device,
                     importance: dict[str, torch.Tensor], times: StageTimes,
                     encoded_before: Optional[dict[str, np.ndarray]] = None) -> Iterator[np.ndarray]:
    """Encoded tensors in plan order, produced one ahead on a background thread; those in encoded_before (already
    encoded, e.g. by GPTQ rounding) are taken from there.

    At most three encoded tensors exist at once (being written, queued, just made) and one source tensor.
    """
    results: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        if device.type == "cpu":
            # This thread only: float casts are memory-bound and the CPU quantizers bring their own threads, while
            # torch's intra-op threads on a busy machine made BF16 conversion 2-3x slower (measured).
            torch.set_num_threads(1)
        try:
            for entry in plan.entries:
                if stop.is_set():
                    return
                if encoded_before and entry.name in encoded_before:
                    results.put(encoded_before[entry.name])
                    continue
                with times.measure("read"):
                    tensor = model.load(model.by_name[entry.name])
                if tuple(tensor.shape) != entry.shape:
                    raise InputError(f"tensor '{entry.name}' has shape {list(tensor.shape)}, the plan says "
                                     f"{list(entry.shape)}")
                with times.measure("quantize"):
                    encoded = encode_tensor(tensor, entry.type, entry.name, device, importance.get(entry.name))
                del tensor      # the source is not kept while waiting for the queue
                results.put(encoded)
            results.put(None)
        except BaseException as exc:  # handed to the writing thread, which raises it
            results.put(exc)

    worker = threading.Thread(target=produce, name="ewq-encode", daemon=True)
    worker.start()
    try:
        while True:
            try:
                # a timeout, so that a signal taken by another thread still reaches this one's handler promptly
                item = results.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                results.get(timeout=0.1)
            except queue.Empty:
                pass
