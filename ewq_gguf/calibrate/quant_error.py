"""Relative quantization error t^2 of each weight in each candidate type, measured with our own quantizers.

t2 = ||W_hat - W||^2 / ||W||^2, and t2_weighted the same with every element weighted by r_i c_j, a row weight times a
column weight (Calibration.error_weights): from a gradient calibration the Fisher information's row and column sums,
whose outer product stands for the Fisher of each element, so that alpha_weighted * t2_weighted is the KL the error
costs (passes.py); from a noise-injection calibration the columns' mean squared activations only (for an input x,
||(W_hat - W) x||^2 averages to sum_j E[x_j^2] ||(W_hat - W)_:j||^2 when columns are uncorrelated). Errors are
computed on the values llama.cpp will see (the adapter's transform applied), quantized with the importance vectors
when they are given, as the written file will be.

Row sample: the error of a type is a property of the distribution of values within blocks of a row, so it is
measured on whole rows worth at most `sample` elements per weight (0: every row), in two strata: the half of them
that carry most of the weighted norm sum_ij r_i c_j W_ij^2, exactly, and the other rows at the relative error of an
even sample of them (a ratio estimate). A few rows can carry most of a weight's Fisher mass (a down projection that
reads a massive activation; the rows of frequent tokens), and an even sample alone then misses them: on SmolLM2 it
was up to 15x off the whole weight's weighted error, the two strata within 0.85..1.17x (5-95%). The rows of stacked
experts (n_expert, rows, columns) are rows like any other, and each is quantized with its own expert's importance
vector, as llama-quantize does.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Optional, Sequence

import torch
from gguf import GGMLQuantizationType as QType

from ..constants import OUTPUT_HEAD, TOKEN_EMBEDDING
from ..progress import progress_bar
from ..quant import can_hold, dequantize, quantize
from ..quant.chunking import default_threads
from ..source.model import SourceModel, TensorSpec

DEFAULT_SAMPLE = 1 << 15
# rows a vocabulary matrix's errors are measured on at least: its Fisher mass spreads over the tokens the text reads
# and predicts, more rows than DEFAULT_SAMPLE elements hold
MIN_VOCABULARY_ROWS = 1024
# rows whose squares are taken at a time
SLICE_ROWS = 1024
VOCABULARY = (TOKEN_EMBEDDING, OUTPUT_HEAD)

# (row weights, column weights) of a weight's weighted error; None: even. Column weights hold one vector per matrix
# of stacked experts, end to end, or one for all of them.
ErrorWeights = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def relative_errors(rows: torch.Tensor, qtype: QType, quant_importance: Optional[torch.Tensor],
                    row_weights: Optional[torch.Tensor] = None,
                    column_weights: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(t2, t2_weighted) of the rows of one matrix stored in qtype, t2_weighted with element (i, j) weighted by
    row_weights[i] * column_weights[j] (either None: even)."""
    rows = rows.to(torch.float32)
    row_weights = _weights(row_weights, rows.shape[0])
    column_weights = _weights(column_weights, rows.shape[1])
    delta, weight = _squared_errors(rows, qtype, quant_importance), rows.double().pow(2)
    return (_ratio(float(delta.sum()), float(weight.sum())),
            _ratio(float(row_weights @ delta @ column_weights), float(row_weights @ weight @ column_weights)))


def _squared_errors(rows: torch.Tensor, qtype: QType, quant_importance: Optional[torch.Tensor]) -> torch.Tensor:
    # one encoder thread: error_tables runs several measurements at once
    restored = dequantize(quantize(rows, qtype, quant_importance, threads=1), qtype, rows.shape[1])
    return (restored - rows).double().pow(2)


def _weights(weights: Optional[torch.Tensor], size: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(size, dtype=torch.float64)
    return weights.to(dtype=torch.float64)


def _ratio(error: float, norm: float) -> float:
    """error / norm, where no error is 0 even against a zero norm: an all-zero weight is stored exactly (0/0 would
    make the optimal planner's cost NaN). An error against a zero norm is inf, which the planner refuses."""
    if error == 0:
        return 0.0
    return error / norm if norm > 0 else math.inf


class RowStrata:
    """The rows of one weight its errors are measured on (module docstring), and the norms of the rest.

    tensor: the weight as the file holds it, 2-D or stacked experts (n_expert, rows, columns); row_weights: one per
    row of all matrices; column_weights: (1 or n_expert, columns)."""

    def __init__(self, tensor: torch.Tensor, row_weights: torch.Tensor, column_weights: torch.Tensor, n_rows: int):
        rows = tensor.reshape(-1, tensor.shape[-1]).to(torch.float32)
        rows_per_matrix = tensor.shape[-2] if tensor.dim() > 2 else rows.shape[0]
        self.matrix_of_row = torch.arange(rows.shape[0]) // rows_per_matrix
        self.row_weights = row_weights
        self.column_weights = column_weights.reshape(-1, rows.shape[1])
        # per row: sum_j W_ij^2, and sum_j r_i c_j W_ij^2 (c: its matrix's column weights), a slice of rows at a time
        # (a vocabulary's squares would be another copy of it)
        plain = torch.empty(rows.shape[0], dtype=torch.float64)
        weighted = torch.empty(rows.shape[0], dtype=torch.float64)
        for start in range(0, rows.shape[0], SLICE_ROWS):
            squares = rows[start:start + SLICE_ROWS].pow(2)
            index = torch.arange(start, start + squares.shape[0])
            plain[index] = squares.sum(1).double()
            weighted[index] = (squares.double() * self._columns(index)).sum(1)
        self.norms = (plain, row_weights * weighted)
        if n_rows >= rows.shape[0]:
            self.heavy, self.even = torch.arange(rows.shape[0]), None
        else:
            order = torch.argsort(self.norms[1], descending=True)
            self.heavy = order[:n_rows // 2]
            rest = order[n_rows // 2:].sort().values
            self.even = rest[torch.linspace(0, len(rest) - 1, n_rows - n_rows // 2).round().long()]
        self.strata = [(index, rows[index]) for index in (self.heavy, self.even) if index is not None]

    def _columns(self, index: torch.Tensor) -> torch.Tensor:
        """The column weights of rows `index` (one row of weights per row)."""
        if self.column_weights.shape[0] == 1:
            return self.column_weights.expand(len(index), -1)
        return self.column_weights[self.matrix_of_row[index]]

    def errors(self, qtype: QType, quant_importance: Optional[torch.Tensor]) -> tuple[float, float]:
        """(t2, t2_weighted) of the whole weight stored in qtype; quant_importance holds one vector per matrix of
        stacked experts (end to end), or one for all of them."""
        measured = []
        for index, rows in self.strata:
            delta = torch.empty(rows.shape, dtype=torch.float64)
            matrices = self.matrix_of_row[index]
            for matrix in matrices.unique().tolist():
                picked = matrices == matrix
                delta[picked] = _squared_errors(rows[picked], qtype,
                                                _matrix_vector(quant_importance, matrix, rows.shape[1]))
            measured.append((float(delta.sum()),
                             float((self.row_weights[index] * (delta * self._columns(index)).sum(1)).sum())))
        t2 = []
        for kind, norms in enumerate(self.norms):
            error = measured[0][kind]
            if self.even is not None:
                sampled = float(norms[self.even].sum())
                if sampled > 0:
                    error += float(norms.sum() - norms[self.heavy].sum()) * measured[1][kind] / sampled
            t2.append(_ratio(error, float(norms.sum())))
        return t2[0], t2[1]


def _matrix_vector(vector: Optional[torch.Tensor], matrix: int, columns: int) -> Optional[torch.Tensor]:
    """Matrix `matrix`'s part of a vector of one or more matrices (a single vector serves every matrix)."""
    if vector is None or vector.numel() == columns:
        return vector
    return vector.reshape(-1, columns)[matrix]


def error_tables(model: SourceModel, specs: Sequence[TensorSpec], types: Sequence[QType],
                 quant_importance: Mapping[str, Callable[[str], Optional[torch.Tensor]]],
                 error_weights: Callable[[str], ErrorWeights], *, sample: int = DEFAULT_SAMPLE,
                 progress: bool = True, threads: Optional[int] = None) -> dict[str, dict[str, dict[str, list[float]]]]:
    """variant -> weight name -> type name -> [t2, t2_weighted], for every type in `types` whose block size fits
    the row; each variant quantizes with its own `quant_importance` (None for a weight: plain quantization).
    error_weights(name): the (row, column) weights of its weighted error, as Calibration.error_weights gives them.

    Each weight is read once for all variants. The samples are a few rows per weight, so they are encoded on the
    CPU whatever device calibrates: a GPU spends more on launching kernels for 8 rows than encoding them costs (all
    backends give the same bytes), and `threads` encoders (the process's CPUs by default) work on different types
    at once instead of splitting rows that are too few to split.
    """
    tables: dict[str, dict[str, dict[str, list[float]]]] = {variant: {} for variant in quant_importance}
    with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="ewq-errors") as pool:
        for spec in progress_bar(specs, desc="quantization errors", unit="weight", enabled=progress):
            tensor = model.load(spec).to("cpu")
            n_rows, n_per_row = tensor.numel() // tensor.shape[-1], tensor.shape[-1]
            wanted = -(-sample // n_per_row) if sample > 0 else n_rows
            if spec.name in VOCABULARY:
                wanted = max(wanted, MIN_VOCABULARY_ROWS)
            row_weights, column_weights = error_weights(spec.name)
            strata = RowStrata(tensor, _weights(row_weights, n_rows), _weights(column_weights, n_per_row), wanted)
            del tensor
            pending = {(variant, qtype): pool.submit(strata.errors, qtype, importance_of(spec.name))
                       for variant, importance_of in quant_importance.items() for qtype in types
                       if can_hold(qtype, n_per_row)}
            for (variant, qtype), done in pending.items():
                tables[variant].setdefault(spec.name, {})[qtype.name] = list(done.result())
    return tables
