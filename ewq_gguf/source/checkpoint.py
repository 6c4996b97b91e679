"""READ: a Hugging Face checkpoint folder (config.json + safetensors, single or sharded), read lazily.

Only headers are read when the folder is opened; a tensor's data is read when it is asked for, one at a time, with
plain reads at the offsets the validated header gives (no memory map, so the process holds only the tensors in use,
however large the checkpoint). The folder is never written to.

Everything in the folder is untrusted: shard names from an index may not lead out of the folder (``../``, absolute
paths, symlinks to elsewhere), and pickle checkpoints (pytorch_model*.bin), which can run code when unpickled, are
refused unless the caller allows them; even then they are read with torch.load(weights_only=True), which unpickles
tensors and plain containers only, memory-mapped so that a tensor's pages are read when it is used.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePath
from typing import Any, Iterator

import torch

from ..errors import InputError
from .safetensors_header import DTYPE_SIZES, TensorRecord, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"

TORCH_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in TORCH_DTYPE_NAMES.items()}


class Checkpoint:
    """A checkpoint folder: its config and a name -> TensorRecord table; tensors load on demand."""

    def __init__(self, model_dir: str | Path, *, allow_pickle: bool = False):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise InputError(f"model folder not found: {self.dir}")
        self.config = read_config(self.dir)
        self.allow_pickle = allow_pickle
        self.records: dict[str, TensorRecord] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        files, pickled = self._weight_files()
        for path in files:
            records = self._read_pickle(path) if pickled else read_header(path)[0]
            for name, record in records.items():
                if name in self.records:
                    raise InputError(f"tensor '{name}' is stored twice, in {self.records[name].file.name} and "
                                     f"{path.name}")
                self.records[name] = record
        if not self.records:
            raise InputError(f"{self.dir}: the weight files hold no tensors")

    # --- which files -------------------------------------------------------------------------------------------
    def _weight_files(self) -> tuple[list[Path], bool]:
        """The weight files to read and whether they are pickles; safetensors win when both are present."""
        found = self._files(INDEX_NAME, SINGLE_NAME, "*.safetensors")
        if found:
            return found, False
        pickles = self._files(PICKLE_INDEX_NAME, PICKLE_SINGLE_NAME, "pytorch_model*.bin")
        if pickles and not self.allow_pickle:
            raise InputError(f"{self.dir}: only pickle checkpoints (pytorch_model*.bin) found; ewq-gguf reads "
                             "safetensors by default, since unpickling can run arbitrary code. Pass --allow-pickle "
                             "(API: allow_pickle=True) to read them with torch.load(weights_only=True)")
        if pickles:
            return pickles, True
        raise InputError(f"{self.dir}: no model weights (model.safetensors or {INDEX_NAME}) found")

    def _files(self, index_name: str, single_name: str, pattern: str) -> list[Path]:
        index = self.dir / index_name
        if index.is_file():
            return [self._contained(name, index.name) for name in _shard_names(index)]
        single = self.dir / single_name
        if single.is_file():
            return [self._contained(single_name, single_name)]
        return [self._contained(path.name, path.name) for path in sorted(self.dir.glob(pattern))]

    def _contained(self, name: str, named_by: str) -> Path:
        """The real path of weight file `name`, refused unless it stays inside the model folder.

        One exception keeps the Hugging Face hub cache working: a snapshot folder's files are symlinks into the
        repository's blobs/ folder beside snapshots/.
        """
        if PurePath(name).is_absolute() or os.path.isabs(name) or ".." in PurePath(name).parts:
            raise InputError(f"{named_by}: weight file '{name}' lies outside the model folder; refusing to read it")
        root = self.dir.resolve()
        allowed = [root]
        if root.parent.name == "snapshots":
            allowed.append(root.parent.parent / "blobs")
        path = (self.dir / name).resolve()
        if not any(path.is_relative_to(folder) for folder in allowed):
            raise InputError(f"{named_by}: weight file '{name}' leads outside the model folder (to {path}); "
                             "refusing to read it")
        if not path.is_file():
            raise InputError(f"{named_by}: shard '{name}' is missing")
        return path

    # --- pickles -----------------------------------------------------------------------------------------------
    def _read_pickle(self, path: Path) -> dict[str, TensorRecord]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{path.name}: cannot be read as a weights-only torch checkpoint ({reason})") from exc
        if not isinstance(state, dict):
            raise InputError(f"{path.name}: holds a {type(state).__name__}, not a name -> tensor dictionary")
        records = {}
        for name, tensor in state.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise InputError(f"{path.name}: entry {name!r} is not a named tensor")
            dtype = TORCH_DTYPE_NAMES.get(tensor.dtype)
            if dtype is None:
                raise InputError(f"{path.name}: tensor '{name}' has unsupported dtype {tensor.dtype}")
            shape = tuple(tensor.shape)
            records[name] = TensorRecord(name, dtype, shape, path, math.prod(shape) * DTYPE_SIZES[dtype])
        self._pickled[path] = state
        return records

    # --- tensors -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TensorRecord]:
        return iter(self.records.values())

    def load(self, name: str) -> torch.Tensor:
        """The tensor's data as stored (bf16/f16/f32), read now from its file. Safe to call from several threads."""
        record = self.records[name]
        if record.file in self._pickled:
            return self._pickled[record.file][name]
        data = torch.empty(record.nbytes, dtype=torch.uint8)
        view, got = memoryview(data.numpy()), 0
        try:
            with open(record.file, "rb", buffering=0) as handle:
                handle.seek(record.offset)
                while got < record.nbytes:      # one read returns at most ~2 GiB on Linux
                    count = handle.readinto(view[got:])
                    if not count:
                        break
                    got += count
        except OSError as exc:
            raise InputError(f"{record.file.name}: cannot read tensor '{name}' ({exc.strerror or exc})") from exc
        if got != record.nbytes:
            raise InputError(f"{record.file.name}: truncated file (tensor '{name}' has {got} of its {record.nbytes} "
                             "bytes; did the file change while converting?)")
        return data.view(TORCH_DTYPES[record.dtype]).reshape(record.shape)

    def close(self) -> None:
        self._pickled.clear()


def _shard_names(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise InputError(f"{index.name}: not a valid index ({exc})") from exc
    if not all(isinstance(name, str) and name for name in names):
        raise InputError(f"{index.name}: not a valid index (shard names must be file names)")
    return names


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: config.json not found (is this a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config
