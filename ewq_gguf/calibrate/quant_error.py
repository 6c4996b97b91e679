"""Relative quantization error t^2 of each weight in each candidate type, measured with our own quantizers.

t2 = ||W_hat - W||^2 / ||W||^2 and t2_weighted = the same with every input column weighted by its mean squared
activation (what reaches the layer's output: for an input x, ||(W_hat - W) x||^2 averages to
sum_j E[x_j^2] ||(W_hat - W)_:j||^2 when columns are uncorrelated), computed on the values llama.cpp will see
(the adapter's transform applied). Quantization is importance-weighted when importance vectors are given, as the
written file will be.

Row sample: the error of a type is a property of the distribution of values within blocks of a row, so it is
measured on at most `sample` elements per weight: whole rows, evenly spaced over the tensor (all rows when the
tensor is smaller). 0 measures every row.
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


def sample_rows(tensor: torch.Tensor, sample: int) -> torch.Tensor:
    """Evenly spaced whole rows holding about `sample` elements (every row when sample is 0 or covers them)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    wanted = -(-sample // rows.shape[1]) if sample > 0 else rows.shape[0]
    if wanted >= rows.shape[0]:
        return rows
    index = torch.linspace(0, rows.shape[0] - 1, wanted).round().long()
    return rows[index]


def relative_errors(rows: torch.Tensor, qtype: QType, quant_importance: Optional[torch.Tensor],
                    column_weights: Optional[torch.Tensor]) -> tuple[float, float]:
    """(t2, t2_weighted) of rows stored in qtype."""
    rows = rows.to(torch.float32)
    # one encoder thread: error_tables runs several measurements at once
    restored = dequantize(quantize(rows, qtype, quant_importance, threads=1), qtype, rows.shape[1])
    delta_columns = (restored - rows).double().pow(2).sum(0)
    weight_columns = rows.double().pow(2).sum(0)
    plain = _ratio(float(delta_columns.sum()), float(weight_columns.sum()))
    if column_weights is None:
        return plain, plain
    column_weights = column_weights.to(device=rows.device, dtype=torch.float64)
    return plain, _ratio(float((column_weights * delta_columns).sum()), float((column_weights * weight_columns).sum()))


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
            rows = sample_rows(tensor, sample).to(torch.float32)
            weights, by_row = column_weights(spec.name), row_weights(spec.name)
            heavy = None if by_row is None else heaviest_rows(tensor.to(torch.float32), by_row, sample)
            del tensor
            fitting = [qtype for qtype in types if can_hold(qtype, spec.shape[-1])]

            def errors(qtype: QType, importance: Optional[torch.Tensor]) -> list[float]:
                if heavy is None:
                    return list(relative_errors(rows, qtype, importance, weights))
                heavy_rows, heavy_weights = heavy
                return [relative_errors(rows, qtype, importance, None)[0],
                        row_weighted_error(heavy_rows, qtype, importance, heavy_weights)]

            pending = {(variant, qtype): pool.submit(errors, qtype, importance_of(spec.name))
                       for variant, importance_of in quant_importance.items() for qtype in fitting}
            for (variant, qtype), done in pending.items():
                tables[variant].setdefault(spec.name, {})[qtype.name] = done.result()
    return tables
