"""WRITE: stream tensors through a Plan into a GGUF file, safely.

The file is written under a unique temporary name beside OUT, re-read with gguf-py's GGUFReader and checked against
the plan, then renamed onto OUT in one step: OUT either does not exist or is complete. Loading and quantizing the
next tensor run on a background thread while the current one is written.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from . import __version__
from .errors import InputError, OutputError
from .plan import Plan
from .progress import progress_bar
from .quant import quantize
from .source.model import SourceModel

# Rows quantized per step: bounds the float32 working copy (~64 MiB) whatever the tensor size.
CHUNK_ELEMENTS = 1 << 24

FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16, QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, QType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
    QType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, QType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    QType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, QType.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
    QType.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS,
}


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    bytes: int


def file_type_of(plan: Plan) -> gguf.LlamaFileType:
    """general.file_type: the type holding most of the 2-D weights' parameters (llama.cpp's label for a mix)."""
    weights: dict[str, int] = {}
    for entry in plan.entries:
        if len(entry.shape) >= 2:
            weights[entry.requested] = weights.get(entry.requested, 0) + entry.numel
    if not weights:
        return gguf.LlamaFileType.ALL_F32
    return FILE_TYPES[QType[max(weights, key=weights.get)]]


def add_plan_metadata(writer: gguf.GGUFWriter, plan: Plan) -> None:
    """ewq.* keys: enough to print the plan back (inspect) and to reuse it (convert --plan FILE.gguf)."""
    writer.add_string("ewq.version", __version__)
    writer.add_string("ewq.method", plan.method)
    writer.add_string("ewq.params", json.dumps(plan.params))
    writer.add_string("ewq.plan", plan.to_json(indent=None))
    writer.add_file_type(file_type_of(plan))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputError(f"{out} exists (use --force to overwrite)")
    if out.is_dir():
        raise OutputError(f"{out} is a folder")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")


def write_gguf(model: SourceModel, plan: Plan, out: str | Path, *, force: bool = False,
               device: torch.device = torch.device("cpu"), importance: Optional[dict[str, torch.Tensor]] = None,
               progress: bool = True) -> WrittenFile:
    """Write `model` as `plan` says to `out`; returns the path and size of the finished file."""
    out = Path(out)
    check_output(out, force)
    temp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.partial")
    writer = gguf.GGUFWriter(temp, model.adapter.arch_name)
    model.add_metadata(writer)
    add_plan_metadata(writer, plan)
    for entry in plan.entries:
        writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), entry.nbytes, raw_dtype=QType[entry.type])
    try:
        free = shutil.disk_usage(out.parent).free
        if free < plan.tensor_bytes:
            raise OutputError(f"not enough free space in {out.parent}: {plan.tensor_bytes / 1e9:.2f} GB needed, "
                              f"{free / 1e9:.2f} GB free")
        with _signals_as_errors():
            _stream(writer, model, plan, temp, device, importance or {}, progress)
            verify(temp, plan)
            os.replace(temp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        writer.close()
        temp.unlink(missing_ok=True)
    return WrittenFile(out, out.stat().st_size)


def _stream(writer: gguf.GGUFWriter, model: SourceModel, plan: Plan, temp: Path, device: torch.device,
            importance: dict[str, torch.Tensor], progress: bool) -> None:
    writer.write_header_to_file(temp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = progress_bar(total=plan.tensor_bytes, desc="writing", unit="B", unit_scale=True, enabled=progress)
    with bar:
        for encoded in _encoded_tensors(model, plan, device, importance):
            writer.write_tensor_data(encoded)
            bar.update(encoded.nbytes)
    writer.close()


def encode_tensor(tensor: torch.Tensor, qtype: QType, name: str, device: torch.device,
                  importance: Optional[torch.Tensor] = None) -> np.ndarray:
    """A tensor's bytes in qtype, quantized on `device` a bounded chunk of rows at a time."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    parts = []
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].to(device=device, dtype=torch.float32, non_blocking=True)
        if not bool(torch.isfinite(chunk).all()):
            raise InputError(f"tensor '{name}' contains NaN or Inf values; refusing to write it")
        parts.append(quantize(chunk, qtype, importance).cpu().numpy())
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _encoded_tensors(model: SourceModel, plan: Plan, device: torch.device,
                     importance: dict[str, torch.Tensor]) -> Iterator[np.ndarray]:
    """Encoded tensors in plan order, produced one ahead on a background thread."""
    results: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for entry in plan.entries:
                if stop.is_set():
                    return
                spec = model.by_name[entry.name]
                tensor = model.load(spec)
                if list(tensor.shape) != entry.shape:
                    raise InputError(f"tensor '{entry.name}' has shape {list(tensor.shape)}, the plan says {entry.shape}")
                results.put(encode_tensor(tensor, QType[entry.type], entry.name, device, importance.get(entry.name)))
            results.put(None)
        except BaseException as exc:  # handed to the writing thread, which raises it
            results.put(exc)

    worker = threading.Thread(target=produce, name="ewq-encode", daemon=True)
    worker.start()
    try:
        while True:
            item = results.get()
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


def verify(path: Path, plan: Plan) -> None:
    """Re-read the written file and check every tensor's name, type and size against the plan."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError and others for malformed files
        raise OutputError(f"the written file does not read back as GGUF ({exc})") from exc
    found = {tensor.name: tensor for tensor in reader.tensors}
    for entry in plan.entries:
        tensor = found.get(entry.name)
        if tensor is None or tensor.tensor_type.name != entry.type or int(tensor.n_bytes) != entry.nbytes:
            raise OutputError(f"the written file does not match the plan at tensor '{entry.name}'")
    if len(found) != len(plan.entries):
        raise OutputError("the written file holds tensors the plan does not name")


class Interrupted(OutputError):
    """SIGTERM or Ctrl-C arrived while writing."""


@contextmanager
def _signals_as_errors() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into an exception so the temporary file is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; nothing was written")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
