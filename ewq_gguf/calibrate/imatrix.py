"""Importance matrices: per-input-column mean squared activations of each weight matrix, in llama.cpp's file formats.

An importance vector for a weight W (rows x columns) holds, per input column j, the mean of x_j^2 over the
calibration tokens that reached W. ggml's quantizers weight each element's squared rounding error by it.

Files (facts from llama.cpp's tools/imatrix/imatrix.cpp and common/imatrix-loader.cpp, not its code):

- GGUF (llama-imatrix's default): key general.type = "imatrix", imatrix.datasets (array of strings),
  imatrix.chunk_count and imatrix.chunk_size (uint32); per weight NAME two F32 tensors, NAME.in_sum2 with ggml shape
  [columns, n_mat] (raw sums of x^2) and NAME.counts with shape [1, n_mat] (tokens summed); n_mat > 1 only for
  stacked experts. The importance is in_sum2 / counts; a zero count reads as all ones.
- legacy .dat: int32 n_entries; per entry int32 name length, name bytes, int32 ncall, int32 n_values,
  n_values float32 holding (sum / count) * ncall; then optionally int32 chunk count, int32 length and the dataset
  name. The importance is values / ncall.

The unit matrix (`--imatrix unit`) gives every column the same importance. It needs no calibration data and still
changes the encoders: given importance weights, ggml searches each block's scale (and minimum) for the smallest
weighted squared error instead of deriving it from the block's extremes, which lowers the error at the same size
(tests/test_calibrate.py checks it for Q4_0; docs/results.md shows the KL divergence of optimal plans made with it).
Q8_0 and F16 ignore it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import torch

from ..constants import (IMATRIX_COUNTS_SUFFIX, IMATRIX_FILE_TYPE, IMATRIX_SUMS_SUFFIX, KEY_IMATRIX_CHUNK_COUNT,
                         KEY_IMATRIX_CHUNK_SIZE, KEY_IMATRIX_DATASETS)
from ..errors import InputError
from ..gguf_file.read import GGUF_MAGIC, read_gguf

UNIT = "unit"   # --imatrix value naming the unit matrix


@dataclass
class ImportanceMatrix:
    """Raw sums of squared activations and token counts per GGUF weight name (n_mat rows each)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)      # name -> float64 (n_mat, columns)
    counts: dict[str, np.ndarray] = field(default_factory=dict)    # name -> float64 (n_mat,)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    unit: bool = False   # the unit matrix: equal importance for every column, measured on nothing

    @classmethod
    def unit_for(cls, columns: dict[str, int]) -> "ImportanceMatrix":
        """The unit matrix for weights `columns` (GGUF name -> row length)."""
        matrix = cls(datasets=[UNIT], unit=True)
        for name, width in columns.items():
            matrix.add(name, np.ones(width), 1)
        return matrix

    def add(self, name: str, sum_of_squares: np.ndarray, count: float, matrix: int = 0, n_mat: int = 1) -> None:
        """Accumulate one batch of activations of matrix `matrix` of a weight of `n_mat` (stacked experts: each
        expert's own, over the tokens routed to it): per-column sum of x^2 over `count` tokens."""
        sums = np.asarray(sum_of_squares, dtype=np.float64).reshape(-1)
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, len(sums)))
            self.counts[name] = np.zeros(n_mat)
        self.sums[name][matrix] += sums
        self.counts[name][matrix] += count

    def vector(self, name: str) -> Optional[np.ndarray]:
        """The importance vector (mean x^2 per column, float32) for a weight, or None when it was not measured."""
        if name not in self.sums:
            return None
        sums, counts = self.sums[name], self.counts[name]
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts[:, None], 1), 1.0)
        return means.reshape(-1).astype(np.float32)

    def vectors(self) -> dict[str, torch.Tensor]:
        """Every importance vector, as write_gguf's `importance` argument takes them."""
        return {name: torch.from_numpy(self.vector(name)) for name in self.sums}

    # --- files -------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write llama-imatrix's GGUF format (llama-quantize --imatrix reads it)."""
        path = Path(path)
        writer = gguf.GGUFWriter(path, arch="")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)   # llama-imatrix writes no architecture
        writer.add_string(gguf.Keys.General.TYPE, IMATRIX_FILE_TYPE)
        writer.add_array(KEY_IMATRIX_DATASETS, list(self.datasets))
        writer.add_uint32(KEY_IMATRIX_CHUNK_COUNT, int(self.chunk_count))
        writer.add_uint32(KEY_IMATRIX_CHUNK_SIZE, int(self.chunk_size))
        for name in sorted(self.sums):   # llama-imatrix sorts names too
            writer.add_tensor(name + IMATRIX_SUMS_SUFFIX, self.sums[name].astype(np.float32))
            writer.add_tensor(name + IMATRIX_COUNTS_SUFFIX, self.counts[name].astype(np.float32).reshape(-1, 1))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as exc:
            raise InputError(f"{path}: cannot write the importance matrix ({exc})") from exc
        finally:
            writer.close()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceMatrix":
        """Read an importance matrix in llama-imatrix's GGUF format or its legacy .dat format."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: importance matrix file not found")
        with path.open("rb") as stream:
            magic = stream.read(4)
        return _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)


def _load_gguf(path: Path) -> ImportanceMatrix:
    file = read_gguf(path)
    matrix = ImportanceMatrix()
    matrix.datasets = [str(value) for value in file.value(KEY_IMATRIX_DATASETS, [])]
    matrix.chunk_count = int(file.metadata.get(KEY_IMATRIX_CHUNK_COUNT, 0))
    matrix.chunk_size = int(file.metadata.get(KEY_IMATRIX_CHUNK_SIZE, 0))
    tensors = {tensor.name: tensor for tensor in file.tensors}
    for tensor_name, tensor in tensors.items():
        if not tensor_name.endswith(IMATRIX_SUMS_SUFFIX):
            continue
        name = tensor_name[:-len(IMATRIX_SUMS_SUFFIX)]
        counts = tensors.get(name + IMATRIX_COUNTS_SUFFIX)
        if counts is None:
            raise InputError(f"{path}: '{name}' has sums but no counts")
        if tensor.type != gguf.GGMLQuantizationType.F32 or counts.type != gguf.GGMLQuantizationType.F32:
            raise InputError(f"{path}: sums and counts of '{name}' must be F32")
        n_mat = counts.n_elements
        matrix.sums[name] = file.f32_values(tensor).astype(np.float64).reshape(n_mat, -1)
        matrix.counts[name] = np.rint(file.f32_values(counts).astype(np.float64).reshape(-1))
    if not matrix.sums:
        raise InputError(f"{path}: a GGUF file without importance data (no *.in_sum2 tensors)")
    return matrix


def _load_legacy(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise InputError(f"{path}: truncated legacy importance matrix")
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise InputError(f"{path}: not an importance matrix (GGUF or legacy .dat)")
    matrix = ImportanceMatrix()
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0:
            raise InputError(f"{path}: malformed legacy importance matrix")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, n_values = take("<ii")
        if n_values < 1:
            raise InputError(f"{path}: entry '{name}' has no values")
        values = np.asarray(take(f"<{n_values}f"), dtype=np.float64)
        # the file stores mean * ncall; as sums with count ncall they read back as the mean
        matrix.sums[name] = values.reshape(1, -1)
        matrix.counts[name] = np.array([float(ncall)])
    if offset + 4 <= len(data):
        (matrix.chunk_count,) = take("<i")
        if offset + 4 <= len(data):
            (length,) = take("<i")
            if length > 0 and offset + length <= len(data):
                matrix.datasets = [take(f"<{length}s")[0].decode("utf-8", errors="replace")]
    return matrix

