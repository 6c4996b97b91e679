"""Relative quantization error t^2 of each weight in each candidate type, measured with our own quantizers.

t2 = ||W_hat - W||^2 / ||W||^2 and t2_weighted = the same with every input column weighted by its mean squared
activation (what reaches the layer's output: for an input x, ||(W_hat - W) x||^2 averages to
sum_j E[x_j^2] ||(W_hat - W)_:j||^2 when columns are uncorrelated), computed on the values llama.cpp will see
(the adapter's transform applied). Quantization is importance-weighted when importance vectors are given, as the
written file will be.

Row sample: the error of a type is a property of the distribution of values within blocks of a row, so it is
measured on at most `sample` elements per weight: whole rows, evenly spaced over the tensor (all rows when the
tensor is smaller). 0 measures every row. The rows of stacked experts (n_expert, rows, columns) are spaced over all
experts' rows, and each is quantized and weighted with its own expert's importance vector, as llama-quantize does.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Optional, Sequence

import torch
from gguf import GGMLQuantizationType as QType

from ..progress import progress_bar
from ..quant import can_hold, dequantize, quantize
from ..quant.ggml_backend import default_threads
from ..source.model import SourceModel, TensorSpec

DEFAULT_SAMPLE = 1 << 15
# rows a row-weighted error is measured on at least: a vocabulary's Fisher mass spreads over the tokens the text
# reads and predicts, more rows than DEFAULT_SAMPLE elements hold
MIN_WEIGHTED_ROWS = 1024


def sample_rows(tensor: torch.Tensor, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced whole rows holding about `sample` elements (every row when sample is 0 or covers them), and
    the matrix each row belongs to (its expert in a 3-D tensor of stacked experts; 0 in a 2-D one)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    rows_per_matrix = tensor.shape[-2] if tensor.dim() > 2 else rows.shape[0]
    wanted = -(-sample // rows.shape[1]) if sample > 0 else rows.shape[0]
    if wanted >= rows.shape[0]:
        index = torch.arange(rows.shape[0])
    else:
        index = torch.linspace(0, rows.shape[0] - 1, wanted).round().long()
    return rows[index], index // rows_per_matrix


def relative_errors(rows: torch.Tensor, qtype: QType, quant_importance: Optional[torch.Tensor],
                    column_weights: Optional[torch.Tensor],
                    matrix_of_row: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(t2, t2_weighted) of rows stored in qtype. The importance and column weights hold one vector per matrix
    (stacked experts: n_expert vectors end to end), `matrix_of_row` says whose each row is."""
    rows = rows.to(torch.float32)
    if matrix_of_row is None:
        matrix_of_row = torch.zeros(rows.shape[0], dtype=torch.long)
    matrix_of_row = matrix_of_row.to(rows.device)
    restored = torch.empty_like(rows)
    for matrix in matrix_of_row.unique().tolist():
        picked = matrix_of_row == matrix
        # one encoder thread: error_tables runs several measurements at once
        restored[picked] = dequantize(quantize(rows[picked], qtype, _matrix_vector(quant_importance, matrix,
                                                                                   rows.shape[1]), threads=1),
                                      qtype, rows.shape[1])
    delta = (restored - rows).double().pow(2)
    squares = rows.double().pow(2)
    plain = _ratio(float(delta.sum()), float(squares.sum()))
    if column_weights is None:
        return plain, plain
    weights = column_weights.to(device=rows.device, dtype=torch.float64).reshape(-1, rows.shape[1])
    weights = weights[matrix_of_row] if weights.shape[0] > 1 else weights
    return plain, _ratio(float((weights * delta).sum()), float((weights * squares).sum()))


def _matrix_vector(vector: Optional[torch.Tensor], matrix: int, columns: int) -> Optional[torch.Tensor]:
    """Matrix `matrix`'s part of a vector of one or more matrices (a single vector serves every matrix)."""
    if vector is None or vector.numel() == columns:
        return vector
    return vector.reshape(-1, columns)[matrix]


def _ratio(error: float, norm: float) -> float:
    """error / norm, where no error is 0 even against a zero norm: an all-zero weight is stored exactly (0/0 would
    make the optimal planner's cost NaN). An error against a zero norm is inf, which the planner refuses."""
    if error == 0:
        return 0.0
    return error / norm if norm > 0 else math.inf


def heaviest_rows(tensor: torch.Tensor, row_weights: torch.Tensor, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows that carry most of sum_r f_r ||W_r||^2 (at least MIN_WEIGHTED_ROWS of them, or `sample` elements'
    worth), with their weights: a row-weighted error measured on them stands for the whole tensor's."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    wanted = max(MIN_WEIGHTED_ROWS, -(-sample // rows.shape[1]) if sample > 0 else rows.shape[0])
    mass = row_weights.to(rows.device) * rows.float().pow(2).sum(1).double()
    index = torch.argsort(mass, descending=True)[:wanted].sort().values
    return rows[index], row_weights.to(rows.device)[index]


def row_weighted_error(rows: torch.Tensor, qtype: QType, quant_importance: Optional[torch.Tensor],
                       row_weights: torch.Tensor) -> float:
    """sum_r f_r ||(W_hat - W)_r||^2 / sum_r f_r ||W_r||^2 of rows stored in qtype."""
    rows = rows.to(torch.float32)
    # one encoder thread: error_tables runs several measurements at once
    restored = dequantize(quantize(rows, qtype, quant_importance, threads=1), qtype, rows.shape[1])
    weights = row_weights.to(device=rows.device, dtype=torch.float64)
    return _ratio(float((weights * (restored - rows).double().pow(2).sum(1)).sum()),
                  float((weights * rows.double().pow(2).sum(1)).sum()))


def error_tables(model: SourceModel, specs: Sequence[TensorSpec], types: Sequence[QType],
                 quant_importance: Mapping[str, Callable[[str], Optional[torch.Tensor]]],
                 column_weights: Callable[[str], Optional[torch.Tensor]], *, sample: int = DEFAULT_SAMPLE,
                 progress: bool = True, row_weights: Callable[[str], Optional[torch.Tensor]] = lambda name: None,
                 threads: Optional[int] = None) -> dict[str, dict[str, dict[str, list[float]]]]:
    """variant -> weight name -> type name -> [t2, t2_weighted], for every type in `types` whose block size fits
    the row; each variant quantizes with its own `quant_importance` (None for a weight: plain quantization).

    t2_weighted weighs input columns by `column_weights`, or, for a weight with `row_weights` (a vocabulary weight
    of a gradient calibration), rows by them, measured on its heaviest rows.

    Each weight is read once for all variants. The samples are a few rows per weight, so they are encoded on the
    CPU whatever device calibrates: a GPU spends more on launching kernels for 8 rows than encoding them costs (all
    backends give the same bytes), and `threads` encoders (the process's CPUs by default) work on different types
    at once instead of splitting rows that are too few to split.
    """
    tables: dict[str, dict[str, dict[str, list[float]]]] = {variant: {} for variant in quant_importance}
    with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="ewq-errors") as pool:
        for spec in progress_bar(specs, desc="quantization errors", unit="weight", enabled=progress):
            tensor = model.load(spec).to("cpu")
            rows, matrix_of_row = sample_rows(tensor, sample)
            rows = rows.to(torch.float32)
            weights, by_row = column_weights(spec.name), row_weights(spec.name)
            heavy = None if by_row is None else heaviest_rows(tensor.to(torch.float32), by_row, sample)
            del tensor
            fitting = [qtype for qtype in types if can_hold(qtype, spec.shape[-1])]

            def errors(qtype: QType, importance: Optional[torch.Tensor]) -> list[float]:
                if heavy is None:
                    return list(relative_errors(rows, qtype, importance, weights, matrix_of_row))
                heavy_rows, heavy_weights = heavy
                return [relative_errors(rows, qtype, importance, None, matrix_of_row)[0],
                        row_weighted_error(heavy_rows, qtype, importance, heavy_weights)]

            pending = {(variant, qtype): pool.submit(errors, qtype, importance_of(spec.name))
                       for variant, importance_of in quant_importance.items() for qtype in fitting}
            for (variant, qtype), done in pending.items():
                tables[variant].setdefault(spec.name, {})[qtype.name] = done.result()
    return tables
