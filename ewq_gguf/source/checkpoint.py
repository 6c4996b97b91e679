"""READ: a Hugging Face checkpoint folder (config.json + safetensors, single or sharded), read lazily.

Only headers are read when the folder is opened; a tensor's data is read when it is asked for, one at a time.
The folder is never written to.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from ..errors import InputError
from .safetensors_header import TensorRecord, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """A checkpoint folder: its config and a name -> TensorRecord table; tensors load on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise InputError(f"model folder not found: {self.dir}")
        self.config = read_config(self.dir)
        self.records: dict[str, TensorRecord] = {}
        for shard in self._shard_files():
            records, _ = read_header(shard)
            self.records.update(records)
        if not self.records:
            raise InputError(f"{self.dir}: the safetensors files hold no tensors")
        self._handles: dict[Path, Any] = {}

    def _shard_files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            return self._shards_from_index(index)
        single = self.dir / SINGLE_NAME
        if single.is_file():
            return [single]
        loose = sorted(self.dir.glob("*.safetensors"))
        if loose:
            return loose
        if any(self.dir.glob("pytorch_model*.bin")):
            raise InputError(f"{self.dir}: only pickle checkpoints (pytorch_model*.bin) found; ewq-gguf reads "
                             "safetensors only, since a pickle can run arbitrary code")
        raise InputError(f"{self.dir}: no model weights (model.safetensors or {INDEX_NAME}) found")

    def _shards_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{index.name}: not a valid safetensors index ({exc})") from exc
        root = self.dir.resolve()
        shards = []
        for name in names:
            shard = (self.dir / str(name)).resolve()
            if shard.parent != root:
                raise InputError(f"{index.name}: shard '{name}' lies outside the model folder; refusing to read it")
            if not shard.is_file():
                raise InputError(f"{index.name}: shard '{name}' is missing")
            shards.append(shard)
        return shards

    def __iter__(self) -> Iterator[TensorRecord]:
        return iter(self.records.values())

    def load(self, name: str) -> torch.Tensor:
        """The tensor's data as stored (bf16/f16/f32), read now from its file."""
        record = self.records[name]
        handle = self._handles.get(record.file)
        if handle is None:
            try:
                handle = safe_open(str(record.file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
                raise InputError(f"{record.file.name}: cannot open ({exc})") from exc
            self._handles[record.file] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: config.json not found (is this a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config
