"""Entropy of weight matrices, computed a block of matrices at a time, exactly from value counts or in bounded float64
chunks on the tensors' device.

Two readings of "the entropy of a weight matrix" exist in public EWQ re-implementations; both come from the same
pass (16-bit floats) or two passes (other dtypes) over the data:

- softmax entropy: p = softmax(flatten(W)), H = -sum p log p (nats). Computed without materialising p: with
  m = max(w), Z = sum exp(w - m) and S = sum w exp(w - m), H = log Z + m - S / Z. Also reported divided by
  log(numel), its maximum, so that matrices of different sizes compare.
- histogram entropy: Shannon entropy in bits of a 128-bin histogram over [min, max]. An element's bin is
  floor((w - min) * (128 / (max - min))), clamped to 127, evaluated in float64: the same operations give the same bin
  on CPU and GPU, so both devices count identically.

16-bit floats (bfloat16, float16, what checkpoints store) take at most 65536 values, so a matrix in one of them is
fully described by how often each bit pattern occurs. Such a block costs one pass over the data, counting patterns on
the device; every statistic then comes from the counts of the distinct values, on the host, as sums of count * f(value)
in float64. This is the same definition (each element's bin and comparison are evaluated on its value, the sums differ
only by float64 rounding) at a few ns an element instead of the tens that converting, exponentiating and binning every
element costs on a CPU; and CPU and GPU give identical results, as the counts are exact integers.

Other dtypes (float32) take the general route. How its work is laid out, and why: all matrices of a block are
processed together, so that a block costs a few dozen tensor operations instead of a few dozen per matrix (on a GPU,
launching operations and waiting for results, not arithmetic, is what costs). The block's matrices are laid end to
end and cut into equal pieces whose length divides every matrix's size (so no piece spans two matrices), at most
PIECE_ELEMENTS long; pieces are grouped into chunks of at most CHUNK_ELEMENTS. A chunk is converted to float64 once
per pass and viewed as a (pieces, piece length) matrix: every reduction is a row reduction, and per-matrix
parameters (the softmax shift, the histogram range) broadcast as one column, with no per-element copies. Row results
come back to the host once per pass and are combined per matrix there, in a fixed order. Every sum is accumulated in
float64, so CPU and GPU agree to rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import InputError
from ..quant import native_backend

HISTOGRAM_BINS = 128
# The longest piece: a row of a row reduction. Many rows keep a GPU busy; few keep the partial results few.
PIECE_ELEMENTS = 1 << 16
# Elements converted to float64 at a time: bounds the working memory (a few x 32 MiB) whatever the block size.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Span:
    """Elements start..stop of matrix `matrix` (flattened) inside a chunk."""

    matrix: int
    start: int
    stop: int


def largest_divisor(number: int, limit: int) -> int:
    """The largest divisor of `number` that is at most `limit`."""
    best = 1
    for small in range(1, math.isqrt(number) + 1):
        if number % small == 0:
            for divisor in (small, number // small):
                if best < divisor <= limit:
                    best = divisor
    return best


class BlockLayout:
    """The chunks and pieces of a block of matrices (see the module docstring)."""

    def __init__(self, tensors: Sequence[torch.Tensor], piece_elements: int = 0):
        self.tensors = [tensor.reshape(-1) for tensor in tensors]
        self.device = self.tensors[0].device
        sizes = [flat.numel() for flat in self.tensors]
        self.piece = largest_divisor(math.gcd(*sizes), piece_elements or PIECE_ELEMENTS)
        chunk_elements = self.piece * max(1, CHUNK_ELEMENTS // self.piece)
        self.chunks: list[list[Span]] = [[]]
        room = chunk_elements
        for matrix, size in enumerate(sizes):
            start = 0
            while start < size:
                if room == 0:
                    self.chunks.append([])
                    room = chunk_elements
                stop = min(size, start + room)
                self.chunks[-1].append(Span(matrix, start, stop))
                room -= stop - start
                start = stop
        # the matrix of every piece (row) of every chunk; span lengths are multiples of the piece length
        self.piece_matrix = [[span.matrix for span in spans for _ in range((span.stop - span.start) // self.piece)]
                             for spans in self.chunks]

    def values(self, chunk: int) -> torch.Tensor:
        """The chunk's elements in float64, one piece per row."""
        parts = [self.tensors[span.matrix][span.start:span.stop] for span in self.chunks[chunk]]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.float64).view(-1, self.piece)

    def column(self, chunk: int, per_matrix: Sequence[Sequence[float]]) -> torch.Tensor:
        """Per-matrix parameters as one row per piece of the chunk, on the device: (pieces, parameters)."""
        rows = torch.tensor([per_matrix[matrix] for matrix in self.piece_matrix[chunk]], dtype=torch.float64)
        return to_device(rows, self.device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the device's queued work (pinned, asynchronous copy)."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Moments:
    """First pass over a matrix: what the second pass needs (extremes) and what ZD pools over a block (sums)."""

    numel: int
    min: float
    max: float
    sum: float
    sum_squares: float


def block_moments(layout: BlockLayout, names: Sequence[str]) -> list[Moments]:
    """First pass: min, max, sum and sum of squares of every matrix; InputError naming a matrix with NaN or Inf."""
    partial = []
    for chunk in range(len(layout.chunks)):
        values = layout.values(chunk)
        low, high = torch.aminmax(values, dim=1)
        partial.append(torch.stack([low, high, values.sum(dim=1), (values * values).sum(dim=1)], dim=1))
    rows = torch.cat(partial).tolist()
    owners = [matrix for chunk_owners in layout.piece_matrix for matrix in chunk_owners]
    combined: list[list[float]] = [[math.inf, -math.inf, 0.0, 0.0] for _ in layout.tensors]
    for matrix, (low, high, total, squares) in zip(owners, rows):
        entry = combined[matrix]
        entry[0], entry[1] = min(entry[0], low), max(entry[1], high)
        entry[2] += total
        entry[3] += squares
    result = []
    for name, flat, entry in zip(names, layout.tensors, combined):
        # NaN can slip through a min/max reduction; it never slips through the sums
        if not all(math.isfinite(value) for value in entry):
            raise InputError(f"tensor '{name}' contains NaN or Inf values; cannot analyse it")
        result.append(Moments(flat.numel(), *entry))
    return result


@dataclass(frozen=True)
class MatrixEntropy:
    """The entropies of one weight matrix (and how many of its elements lie above a block's ZD threshold)."""

    name: str
    numel: int
    softmax: float              # nats
    softmax_normalized: float   # softmax / log(numel), in [0, 1]
    histogram: float            # bits, at most log2(HISTOGRAM_BINS) = 7
    above_threshold: int = 0


def _count_bins(bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Counts of bin numbers 0..n_bins-1 (int32 or integer-valued float64), exactly, as float64.

    On a GPU histc with [0, n_bins] maps an integer x to bin x exactly and needs no host synchronisation (bincount
    reads the input's range back first); on a CPU bincount is the fast one, and takes int32 as it is."""
    if bins.is_cuda:
        return torch.histc(bins.to(torch.float64), bins=n_bins, min=0, max=n_bins)
    return torch.bincount(bins if bins.dtype == torch.int32 else bins.to(torch.int64),
                          minlength=n_bins).to(torch.float64)


def block_entropies(layout: BlockLayout, names: Sequence[str], moments: Sequence[Moments],
                    threshold: float = math.inf) -> list[MatrixEntropy]:
    """Second pass: softmax and histogram entropy of every matrix, and its count of elements > threshold."""
    n_matrices = len(layout.tensors)
    # per matrix: the softmax shift, the histogram origin and scale, and the matrix's first bin in a joint histogram
    parameters = [[stats.max, stats.min,
                   HISTOGRAM_BINS / (stats.max - stats.min) if stats.max > stats.min else 0.0,
                   float(matrix * HISTOGRAM_BINS)]
                  for matrix, stats in enumerate(moments)]
    counts = torch.zeros(n_matrices * HISTOGRAM_BINS, dtype=torch.float64, device=layout.device)
    partial = []
    for chunk in range(len(layout.chunks)):
        values = layout.values(chunk)
        per_piece = layout.column(chunk, parameters)
        exps = torch.exp(values - per_piece[:, 0:1])
        bins = ((values - per_piece[:, 1:2]) * per_piece[:, 2:3]).floor_().clamp_(0, HISTOGRAM_BINS - 1)
        counts += _count_bins(bins.add_(per_piece[:, 3:4]).reshape(-1), n_matrices * HISTOGRAM_BINS)
        partial.append(torch.stack([exps.sum(dim=1), (values * exps).sum(dim=1),
                                    (values > threshold).sum(dim=1).to(torch.float64)], dim=1))
    rows = torch.cat(partial).tolist()
    histogram = counts.reshape(n_matrices, HISTOGRAM_BINS).tolist()
    owners = [matrix for chunk_owners in layout.piece_matrix for matrix in chunk_owners]
    sums = [[0.0, 0.0, 0.0] for _ in range(n_matrices)]
    for matrix, row in zip(owners, rows):
        for column in range(3):
            sums[matrix][column] += row[column]
    return [_matrix_entropy(name, stats, *matrix_sums, matrix_counts)
            for name, stats, matrix_sums, matrix_counts in zip(names, moments, sums, histogram)]


def _matrix_entropy(name: str, stats: Moments, z_value: float, weighted: float, above: float,
                    histogram: Sequence[float]) -> MatrixEntropy:
    """A matrix's entropies from its second-pass sums: Z = sum exp(w - max), weighted = sum w exp(w - max)."""
    softmax = math.log(z_value) + stats.max - weighted / z_value
    numel = stats.numel
    return MatrixEntropy(name, numel, softmax, softmax / math.log(numel) if numel > 1 else 0.0,
                         histogram_bits(histogram), int(above))


class ValueCounts:
    """A block of 16-bit float matrices as how often each matrix holds each of the dtype's 65536 values (see the
    module docstring): counts[matrix, pattern + 32768] for the signed 16-bit pattern, exact, as float64 on the host."""

    PATTERNS = 1 << 16

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.numel = [tensor.numel() for tensor in tensors]
        self.counts = torch.stack([self._count(tensor) for tensor in tensors]).to("cpu", torch.float64)
        patterns = torch.arange(-self.PATTERNS // 2, self.PATTERNS // 2, dtype=torch.int32).to(torch.int16)
        self.values = patterns.view(tensors[0].dtype).to(torch.float64)

    @classmethod
    def _count(cls, tensor: torch.Tensor) -> torch.Tensor:
        """One matrix's counts, on its device: by the native extension's loop on a CPU where it is built."""
        if tensor.device.type == "cpu" and native_backend.available():
            return native_backend.count_patterns(tensor)
        return _count_bins(tensor.reshape(-1).view(torch.int16).to(torch.int32).add_(cls.PATTERNS // 2), cls.PATTERNS)

    @staticmethod
    def applies(tensors: Sequence[torch.Tensor]) -> bool:
        return tensors[0].dtype in (torch.bfloat16, torch.float16) and all(
            tensor.dtype == tensors[0].dtype for tensor in tensors)

    def present(self, matrix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The matrix's distinct values and their counts."""
        held = self.counts[matrix] > 0
        return self.values[held], self.counts[matrix][held]

    def moments(self, names: Sequence[str]) -> list[Moments]:
        """block_moments' results, from the counts."""
        result = []
        for matrix, name in enumerate(names):
            values, counts = self.present(matrix)
            if not bool(torch.isfinite(values).all()):
                raise InputError(f"tensor '{name}' contains NaN or Inf values; cannot analyse it")
            result.append(Moments(self.numel[matrix], values.min().item(), values.max().item(),
                                  (counts * values).sum().item(), (counts * values * values).sum().item()))
        return result

    def entropies(self, names: Sequence[str], moments: Sequence[Moments],
                  threshold: float = math.inf) -> list[MatrixEntropy]:
        """block_entropies' results, from the counts: each distinct value stands for `count` elements."""
        result = []
        for matrix, (name, stats) in enumerate(zip(names, moments)):
            values, counts = self.present(matrix)
            weighted_exps = counts * torch.exp(values - stats.max)
            scale = HISTOGRAM_BINS / (stats.max - stats.min) if stats.max > stats.min else 0.0
            bins = ((values - stats.min) * scale).floor_().clamp_(0, HISTOGRAM_BINS - 1).to(torch.int64)
            histogram = torch.bincount(bins, weights=counts, minlength=HISTOGRAM_BINS)
            result.append(_matrix_entropy(name, stats, weighted_exps.sum().item(),
                                          (values * weighted_exps).sum().item(),
                                          counts[values > threshold].sum().item(), histogram.tolist()))
        return result


def block_statistics(tensors: Sequence[torch.Tensor], names: Sequence[str],
                     threshold_of: Optional[Callable[[Sequence[Moments]], float]] = None) -> list[MatrixEntropy]:
    """Entropies of a block's matrices, counting elements above threshold_of(the block's moments) if given; by
    value counts where the dtype allows, else in two passes over the data."""
    if ValueCounts.applies(tensors):
        table = ValueCounts(tensors)
        moments = table.moments(names)
        return table.entropies(names, moments, threshold_of(moments) if threshold_of else math.inf)
    layout = BlockLayout(tensors)
    moments = block_moments(layout, names)
    return block_entropies(layout, names, moments, threshold_of(moments) if threshold_of else math.inf)


def histogram_bits(counts: Sequence[float]) -> float:
    """Shannon entropy (bits) of a histogram given as counts."""
    total = sum(counts)
    return -sum(count / total * math.log2(count / total) for count in counts if count)


def matrix_entropy(tensor: torch.Tensor, name: str = "tensor") -> MatrixEntropy:
    """Both entropies of one matrix."""
    if tensor.numel() == 0:
        raise InputError(f"tensor '{name}' is empty")
    return block_statistics([tensor], [name])[0]


def softmax_entropy(tensor: torch.Tensor) -> float:
    """H(softmax(flatten(W))) in nats."""
    return matrix_entropy(tensor).softmax


def histogram_entropy(tensor: torch.Tensor) -> float:
    """Shannon entropy in bits of the 128-bin histogram of W over [min, max]."""
    return matrix_entropy(tensor).histogram
