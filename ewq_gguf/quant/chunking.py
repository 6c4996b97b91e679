"""How the encoders cut their input: chunks of whole rows that bound working memory, blocks laid element-major, and
pieces of rows for the CPU backends' threads.

Element-major (element i of every block along dim 0) turns ggml's loops over a block's elements into whole-tensor
operations, one element at a time, in ggml's order.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

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


# Pieces per thread: a few, so that a thread slowed by other work on the machine does not hold up the rest.
PIECES_PER_THREAD = 4


def default_threads() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def in_row_pieces(n_rows: int, threads: Optional[int], encode: Callable[[int, int], None]) -> None:
    """encode(first, last) over disjoint pieces of rows 0..n_rows, on `threads` threads (default_threads() when None).

    For encoders that release the GIL (ggml's through ctypes, the native ones) and share no mutable state between
    row ranges: the pieces then run in parallel.
    """
    threads = max(1, threads or default_threads())
    pieces = min(n_rows, threads * PIECES_PER_THREAD) if threads > 1 else 1
    if pieces <= 1:
        encode(0, n_rows)
        return
    bounds = [n_rows * i // pieces for i in range(pieces + 1)]
    # a pool per call: its threads cost microseconds against the encoding, and nothing outlives the call (a
    # process forked later inherits no half-dead pool)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ewq-encode") as pool:
        for done in [pool.submit(encode, first, last) for first, last in zip(bounds, bounds[1:])]:
            done.result()
