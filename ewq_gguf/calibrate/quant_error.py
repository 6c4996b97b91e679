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
was up to 15x off the whole weight's weighted error, the two strata within 0.85..1.17x (5-95%).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from gguf import GGMLQuantizationType as QType

from ..progress import progress_bar
from ..quant import can_hold, dequantize, quantize
from ..source.model import OUTPUT_HEAD, SourceModel, TOKEN_EMBEDDING, TensorSpec

DEFAULT_SAMPLE = 1 << 15
# rows a vocabulary matrix's errors are measured on at least: its Fisher mass spreads over the tokens the text reads
# and predicts, more rows than DEFAULT_SAMPLE elements hold
MIN_VOCABULARY_ROWS = 1024
VOCABULARY = (TOKEN_EMBEDDING, OUTPUT_HEAD)

ErrorWeights = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def relative_errors(rows: torch.Tensor, qtype: QType, quant_importance: Optional[torch.Tensor],
                    row_weights: Optional[torch.Tensor] = None,
                    column_weights: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(t2, t2_weighted) of rows stored in qtype, t2_weighted with element (i, j) weighted by row_weights[i] *
    column_weights[j] (either None: even)."""
    rows = rows.to(torch.float32)
    row_weights = _weights(row_weights, rows.shape[0], rows.device)
    column_weights = _weights(column_weights, rows.shape[1], rows.device)
    delta, weight = _squared_errors(rows, qtype, quant_importance), rows.double().pow(2)
    return (_ratio(float(delta.sum()), float(weight.sum())),
            _ratio(float(row_weights @ delta @ column_weights), float(row_weights @ weight @ column_weights)))


def _squared_errors(rows: torch.Tensor, qtype: QType, quant_importance: Optional[torch.Tensor]) -> torch.Tensor:
    restored = dequantize(quantize(rows, qtype, quant_importance), qtype, rows.shape[1])
    return (restored - rows).double().pow(2)


def _weights(weights: Optional[torch.Tensor], size: int, device: torch.device) -> torch.Tensor:
    if weights is None:
        return torch.ones(size, dtype=torch.float64, device=device)
    return weights.to(device=device, dtype=torch.float64)


def _ratio(error: float, norm: float) -> float:
    """error / norm, where no error is 0 even against a zero norm: an all-zero weight is stored exactly (0/0 would
    make the optimal planner's cost NaN). An error against a zero norm is inf, which the planner refuses."""
    if error == 0:
        return 0.0
    return error / norm if norm > 0 else math.inf


class RowStrata:
    """The rows of one weight its errors are measured on (module docstring), and the norms of the rest."""

    def __init__(self, tensor: torch.Tensor, row_weights: torch.Tensor, column_weights: torch.Tensor,
                 n_rows: int):
        rows = tensor.reshape(-1, tensor.shape[-1]).to(torch.float32)
        squares = rows.pow(2)
        self.row_weights, self.column_weights = row_weights, column_weights
        # per row: sum_j W_ij^2, and sum_j r_i c_j W_ij^2
        self.norms = (squares.sum(1).double(), row_weights * (squares @ column_weights.float()).double())
        del squares
        if n_rows >= rows.shape[0]:
            self.heavy, self.even = torch.arange(rows.shape[0], device=rows.device), None
        else:
            order = torch.argsort(self.norms[1], descending=True)
            self.heavy = order[:n_rows // 2]
            rest = order[n_rows // 2:].sort().values
            self.even = rest[torch.linspace(0, len(rest) - 1, n_rows - n_rows // 2, device=rest.device).round().long()]
        self.strata = [(index, rows[index]) for index in (self.heavy, self.even) if index is not None]

    def errors(self, qtype: QType, quant_importance: Optional[torch.Tensor]) -> tuple[float, float]:
        """(t2, t2_weighted) of the whole weight stored in qtype."""
        measured = []
        for index, rows in self.strata:
            delta = _squared_errors(rows, qtype, quant_importance)
            measured.append((float(delta.sum()), float(self.row_weights[index] @ delta @ self.column_weights)))
        t2 = []
        for kind, norms in enumerate(self.norms):
            error = measured[0][kind]
            if self.even is not None:
                sampled = float(norms[self.even].sum())
                if sampled > 0:
                    error += float(norms.sum() - norms[self.heavy].sum()) * measured[1][kind] / sampled
            t2.append(_ratio(error, float(norms.sum())))
        return t2[0], t2[1]


def error_table(model: SourceModel, specs: Sequence[TensorSpec], types: Sequence[QType],
                quant_importance: Callable[[str], Optional[torch.Tensor]],
                error_weights: Callable[[str], ErrorWeights], *, sample: int = DEFAULT_SAMPLE,
                device: torch.device = torch.device("cpu"), progress: bool = True,
                ) -> dict[str, dict[str, list[float]]]:
    """weight name -> type name -> [t2, t2_weighted], for every type in `types` whose block size fits the row.

    error_weights(name): the (row, column) weights of its weighted error, as Calibration.error_weights gives them."""
    table: dict[str, dict[str, list[float]]] = {}
    for spec in progress_bar(specs, desc="quantization errors", unit="weight", enabled=progress):
        tensor = model.load(spec).to(device)
        n_rows, n_per_row = tensor.numel() // tensor.shape[-1], tensor.shape[-1]
        wanted = -(-sample // n_per_row) if sample > 0 else n_rows
        if spec.name in VOCABULARY:
            wanted = max(wanted, MIN_VOCABULARY_ROWS)
        row_weights, column_weights = error_weights(spec.name)
        strata = RowStrata(tensor, _weights(row_weights, n_rows, device), _weights(column_weights, n_per_row, device),
                           wanted)
        importance = quant_importance(spec.name)
        table[spec.name] = {qtype.name: list(strata.errors(qtype, importance)) for qtype in types
                            if can_hold(qtype, n_per_row)}
    return table
