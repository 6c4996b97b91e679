"""A calibration: what running the model on real text measured, saved once and reused by every later plan.

Saved as CALIB.json plus a sibling CALIB.imatrix.gguf (llama-imatrix's GGUF format, so llama-quantize --imatrix
reads ours too). The JSON holds, per block, the LIM score; per weight, the sensitivity alpha (from gradients, with
one estimate per calibration sequence and the Fisher information's row and column sums, or from noise injection,
with its raw measurements); and, when measured, the relative quantization error of every candidate type.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import InputError
from .imatrix import UNIT, ImportanceMatrix
from ..source.model import SourceModel

CALIBRATION_FORMAT = 3
# format 1: noise-injection sensitivities only, no per-sequence samples; format 2: Fisher rows for the vocabulary's
# matrices only, which weigh their errors by row alone
READABLE_FORMATS = (1, 2, 3)
IMATRIX_SUFFIX = ".imatrix.gguf"


def model_fingerprint(model: SourceModel) -> str:
    """Digest of the model's tensor names and shapes: a calibration is only valid for the model it measured."""
    digest = hashlib.sha256()
    for spec in model.specs:
        digest.update(f"{spec.name}:{'x'.join(map(str, spec.shape))};".encode())
    return digest.hexdigest()[:16]


@dataclass
class Sensitivity:
    """How much one weight's error costs: the predicted KL increase of an error of relative size t2 is alpha * t2
    (alpha_weighted * t2_weighted for errors weighted element by element, Calibration.error_weights:
    t2_weighted = sum_ij r_i c_j E_ij^2 / sum_ij r_i c_j W_ij^2).

    From gradients (passes.py): samples[k] is the estimate from calibration sequence k alone, alpha their mean; the
    spread over sequences is the uncertainty. From noise injection: t2[k] = ||E||^2 / ||W||^2 (exactly the level asked
    for), t2_weighted[k] its weighted size and kl[k] the measured KL(base || noisy) per token; alpha and
    alpha_weighted are least-squares slopes through the origin of kl against each.
    """

    alpha: float
    alpha_weighted: float
    t2: list[float] = field(default_factory=list)
    t2_weighted: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)
    samples_weighted: list[float] = field(default_factory=list)


@dataclass
class Calibration:
    model: str
    fingerprint: str
    n_blocks: int
    text: str
    text_sha256: str
    tokens: int                                # tokens the activations (imatrix, LIM) were collected over
    ctx: int
    device: str
    lim: list[float]                           # per block: -mean cos(block input, block output)
    sensitivity: dict[str, Sensitivity]        # GGUF weight name -> its measured sensitivity
    sensitivity_tokens: int
    noise_levels: list[float]                  # noise injection's levels (empty for gradients)
    sensitivity_method: str = "noise"          # "fisher" (gradients) or "noise" (noise injection)
    seconds: dict[str, float] = field(default_factory=dict)
    # quantization errors: "plain" | "imatrix" -> weight -> type -> [t2, t2_weighted]
    errors: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    error_sample: int = 0                      # elements per weight the errors were measured on (0: all)
    # gradient calibrations: per weight, the Fisher information per token summed over each row (in the file's row
    # order) and over each column; their outer product weighs its errors
    row_fisher: dict[str, list[float]] = field(default_factory=dict)
    column_fisher: dict[str, list[float]] = field(default_factory=dict)
    imatrix: ImportanceMatrix = field(default_factory=ImportanceMatrix)

    def check_matches(self, model: SourceModel) -> None:
        if self.fingerprint != model_fingerprint(model):
            raise InputError(f"the calibration of '{self.model}' does not match this model (other tensor names or "
                             "shapes); run `ewq-gguf calibrate` on this model")

    def lim_scores(self) -> np.ndarray:
        return np.asarray(self.lim, dtype=np.float64)

    def error_weights(self, name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(row weights r, column weights c) of a weight's weighted errors, None for even ones: its Fisher row and
        column sums from a gradient calibration; for a noise-injection calibration, its importance vector's columns
        (the mean squared activations the noise was weighted by)."""
        rows, columns = self.row_fisher.get(name), self.column_fisher.get(name)
        if not rows and not columns:
            vector = self.imatrix.vector(name)
            return None, (None if vector is None else torch.from_numpy(vector).double())
        return (torch.tensor(rows, dtype=torch.float64) if rows else None,
                torch.tensor(columns, dtype=torch.float64) if columns else None)

    def alpha(self, name: str, weighted: bool) -> Optional[float]:
        measured = self.sensitivity.get(name)
        if measured is None:
            return None
        return measured.alpha_weighted if weighted else measured.alpha

    # --- files -------------------------------------------------------------------------------------------------
    def to_dict(self, imatrix_file: str) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if key != "imatrix"}
        data["format"] = CALIBRATION_FORMAT
        data["imatrix_file"] = imatrix_file
        return data

    def save(self, path: str | Path) -> Path:
        """Write PATH (JSON) and PATH's stem + .imatrix.gguf beside it; returns the JSON path. Each is written under
        a temporary name and renamed when complete, the JSON last: a calibration JSON that exists is whole."""
        path = Path(path)
        imatrix_path = imatrix_path_for(path)
        partial_imatrix = imatrix_path.with_name(imatrix_path.name + ".partial")
        partial_json = path.with_name(path.name + ".partial")
        try:
            self.imatrix.save(partial_imatrix)
            os.replace(partial_imatrix, imatrix_path)
            partial_json.write_text(json.dumps(self.to_dict(imatrix_path.name), indent=1))
            os.replace(partial_json, path)
        except OSError as exc:
            raise InputError(f"{path}: cannot write the calibration ({exc})") from exc
        finally:
            partial_imatrix.unlink(missing_ok=True)
            partial_json.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"calibration file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a calibration JSON ({exc})") from exc
        try:
            if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
                raise ValueError(f"calibration format {data.get('format') if isinstance(data, dict) else None!r}, "
                                 f"expected one of {READABLE_FORMATS}")
            imatrix_file = path.parent / data.pop("imatrix_file")
            data.pop("format")
            data["sensitivity"] = {name: Sensitivity(**value) for name, value in data["sensitivity"].items()}
            calibration = cls(**data)
            if len(calibration.lim) != calibration.n_blocks:
                raise ValueError("one LIM score per block expected")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{path}: not a valid ewq-gguf calibration ({exc})") from exc
        calibration.imatrix = ImportanceMatrix.load(imatrix_file)
        return calibration


def imatrix_path_for(calibration_path: str | Path) -> Path:
    path = Path(calibration_path)
    return path.with_name(path.stem + IMATRIX_SUFFIX)


def is_calibration_file(path: str | Path) -> bool:
    """A calibration JSON (as opposed to an importance matrix file)."""
    path = Path(path)
    with path.open("rb") as stream:
        start = stream.read(64).lstrip()
    return start.startswith(b"{")


def load_importance(path: str | Path, model: Optional[SourceModel] = None) -> ImportanceMatrix:
    """The importance matrix of a calibration JSON, or an importance matrix file (llama-imatrix GGUF or .dat), or
    the unit matrix of `model`'s weights when `path` is "unit". With `model`, each vector must fit the input width of
    the weight it names."""
    if str(path) == UNIT:
        if model is None:
            raise InputError("the unit importance matrix needs the model whose weights it covers")
        return ImportanceMatrix.unit_for({spec.name: spec.shape[-1] for spec in model.specs if spec.is_matrix})
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: importance matrix file not found")
    matrix = Calibration.load(path).imatrix if is_calibration_file(path) else ImportanceMatrix.load(path)
    if model is not None:
        for name, sums in matrix.sums.items():
            spec = model.by_name.get(name)
            if spec is not None and spec.is_matrix and sums.size != spec.shape[-1]:
                raise InputError(f"{path}: the importance vector of '{name}' has {sums.size} values, the weight's "
                                 f"rows have {spec.shape[-1]}")
    return matrix
