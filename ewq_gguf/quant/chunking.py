"""How the encoders cut their input: chunks of whole rows that bound working memory, and blocks laid element-major.

Element-major (element i of every block along dim 0) turns ggml's loops over a block's elements into whole-tensor
operations, one element at a time, in ggml's order.
"""
from __future__ import annotations

from typing import Callable

import torch


GPU_CHUNK_FACTOR = 64


def device_chunk_values(device: torch.device, cpu_chunk_values: int) -> int:
    """Values per chunk on device: a GPU takes chunks GPU_CHUNK_FACTOR times larger than the CPU's cache-sized
    ones, since there every torch call costs a kernel launch and memory is plentiful."""
    return cpu_chunk_values * (GPU_CHUNK_FACTOR if device.type == "cuda" else 1)


def row_chunks(n_rows: int, n_per_row: int, chunk_values: int):
    """Slices of rows holding about chunk_values values each (at least one row), to bound working memory."""
    rows_per_chunk = max(1, chunk_values // max(1, n_per_row))
    for start in range(0, n_rows, rows_per_chunk):
        yield slice(start, min(n_rows, start + rows_per_chunk))


def encode_in_chunks(rows: torch.Tensor, row_nbytes: int, cpu_chunk_values: int,
                     encode: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """encode(chunk) -> the uint8 bytes of rows[chunk], over chunks of whole rows of about cpu_chunk_values values
    (more on a GPU, see device_chunk_values), into one (n_rows, row_nbytes) tensor on the rows' device."""
    n_rows, n_per_row = rows.shape
    output = torch.empty((n_rows, row_nbytes), dtype=torch.uint8, device=rows.device)
    for chunk in row_chunks(n_rows, n_per_row, device_chunk_values(rows.device, cpu_chunk_values)):
        output[chunk] = encode(chunk).reshape(-1, row_nbytes)
    return output


def to_element_major(rows: torch.Tensor, block: int) -> torch.Tensor:
    """(R, N) -> (block, R*N/block): element i of every block along dim 0, blocks in row order along dim 1."""
    return rows.reshape(-1, block).t().contiguous()
