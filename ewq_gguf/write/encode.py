"""Tensors to GGUF bytes for the writer: read from the model, checked finite, quantized a bounded chunk at a time.

Reading and quantizing run on a background thread, ahead of the one being written (from before the header is
written, within a bounded number of bytes), so that disk and encoder work at once while memory holds a few tensors,
whatever the size of the checkpoint.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Iterator, Mapping, Optional

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


# Encoded bytes the background thread may make ahead of the writer: while the header is built (a 150k-token
# vocabulary takes seconds of Python) it encodes the first tensors; the bound keeps memory at this plus one tensor,
# whatever the model size.
AHEAD_BYTES = 256 << 20


class EncodedTensors:
    """Encoded tensors in plan order, made on a background thread from the moment this object exists (before the
    header is written), at most AHEAD_BYTES ahead of the writer (and always one tensor); those in encoded_before
    (already encoded, e.g. by GPTQ rounding) are taken from there. Iterate once; close() stops the thread (use
    contextlib.closing), also when iteration never started."""

    def __init__(self, model: SourceModel, plan: Plan, device: torch.device, importance: dict[str, torch.Tensor],
                 times: StageTimes, encoded_before: Optional[Mapping[str, np.ndarray]] = None):
        self._items: deque = deque()
        self._queued_bytes = 0
        self._ready = threading.Condition()
        self._stop = threading.Event()

        def produce() -> None:
            if device.type == "cpu":
                # This thread only: float casts are memory-bound and the CPU quantizers bring their own threads,
                # while torch's intra-op threads on a busy machine made BF16 conversion 2-3x slower (measured).
                torch.set_num_threads(1)
            try:
                for entry in plan.entries:
                    if self._stop.is_set():
                        return
                    if encoded_before and entry.name in encoded_before:
                        self._put(encoded_before[entry.name])
                        continue
                    with times.measure("read"):
                        tensor = model.load(model.by_name[entry.name])
                    if tuple(tensor.shape) != entry.shape:
                        raise InputError(f"tensor '{entry.name}' has shape {list(tensor.shape)}, the plan says "
                                         f"{list(entry.shape)}")
                    with times.measure("quantize"):
                        encoded = encode_tensor(tensor, entry.type, entry.name, device, importance.get(entry.name))
                    del tensor      # the source is not kept while waiting for room
                    self._put(encoded)
                self._put(None)
            except BaseException as exc:  # handed to the writing thread, which raises it
                self._put(exc)

        self._worker = threading.Thread(target=produce, name="ewq-encode", daemon=True)
        self._worker.start()

    def _put(self, item) -> None:
        nbytes = item.nbytes if isinstance(item, np.ndarray) else 0
        with self._ready:
            while self._items and self._queued_bytes + nbytes > AHEAD_BYTES and not self._stop.is_set():
                self._ready.wait(0.5)
            self._items.append(item)
            self._queued_bytes += nbytes
            self._ready.notify_all()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            with self._ready:
                # a timeout, so that a signal taken by another thread still reaches this one's handler promptly
                while not self._items:
                    self._ready.wait(0.5)
                item = self._items.popleft()
                self._queued_bytes -= item.nbytes if isinstance(item, np.ndarray) else 0
                self._ready.notify_all()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        with self._ready:
            self._items.clear()
            self._queued_bytes = 0
            self._ready.notify_all()
        self._worker.join()
