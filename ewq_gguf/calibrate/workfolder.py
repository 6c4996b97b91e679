"""The files of an unfinished calibration, beside its output, so that a rerun continues where the last one stopped.

A calibration streams the model block by block; what one block hands the next (the hidden states of every
calibration chunk, later their gradients) lives in files here rather than in memory, read and written one chunk at
a time. After each finished step the accumulated measurements and the step count are saved (state.json, written
under a temporary name and renamed), and a step never overwrites what it reads: hidden states alternate between two
files. A process killed anywhere therefore leaves a folder from which the same arguments resume at the last
finished step; other arguments (another model, text, token count) start afresh.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE = "state.json"


def work_folder_for(output: str | Path) -> Path:
    """The work folder of the calibration written to `output`: beside it, OUTPUT.work."""
    output = Path(output)
    return output.with_name(output.name + ".work")


class ChunkFile:
    """float32 chunks of one shape, stored back to back in one file; read and written one chunk at a time."""

    def __init__(self, path: Path, n_chunks: int, chunk_shape: tuple[int, ...]):
        self.path = path
        self.shape = tuple(chunk_shape)
        self.chunk_elements = int(np.prod(chunk_shape))
        if not path.exists() or path.stat().st_size != 4 * n_chunks * self.chunk_elements:
            with path.open("wb") as stream:
                stream.truncate(4 * n_chunks * self.chunk_elements)

    def read(self, index: int, device: torch.device) -> torch.Tensor:
        values = np.fromfile(self.path, dtype=np.float32, count=self.chunk_elements,
                             offset=4 * index * self.chunk_elements)
        return torch.from_numpy(values).reshape(self.shape).to(device)

    def write(self, index: int, tensor: torch.Tensor) -> None:
        values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        with self.path.open("r+b") as stream:
            stream.seek(4 * index * self.chunk_elements)
            stream.write(values.tobytes())


class WorkFolder:
    """state.json (what is finished, and the small measurements so far) plus chunk files and arrays."""

    def __init__(self, path: Path, key: dict[str, Any]):
        self.path = path
        self.key = key
        self.state: dict[str, Any] = {}
        saved = self._read_state()
        if saved is not None and saved.get("key") == key:
            self.state = saved["state"]
            self.resumed = True
        else:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            self.resumed = False

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / STATE).read_text())
        except (OSError, ValueError):
            return None

    def save(self) -> None:
        """Record the state: only steps whose files are complete are recorded, so this comes after them."""
        temporary = self.path / (STATE + ".partial")
        temporary.write_text(json.dumps({"key": self.key, "state": self.state}))
        os.replace(temporary, self.path / STATE)

    def chunks(self, name: str, n_chunks: int, chunk_shape: tuple[int, ...]) -> ChunkFile:
        return ChunkFile(self.path / f"{name}.f32", n_chunks, chunk_shape)

    def drop(self, name: str) -> None:
        (self.path / f"{name}.f32").unlink(missing_ok=True)

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        temporary = self.path / f"{name}.partial.npz"
        np.savez(temporary, **arrays)
        os.replace(temporary, self.path / f"{name}.npz")

    def load_arrays(self, name: str) -> dict[str, np.ndarray]:
        path = self.path / f"{name}.npz"
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {key: data[key] for key in data.files}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
