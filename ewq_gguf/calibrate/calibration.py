"""A calibration: what running the model on real text measured, saved once and reused by every later plan.

Saved as CALIB.json plus a sibling CALIB.imatrix.gguf (llama-imatrix's GGUF format, so llama-quantize --imatrix
reads ours too). The JSON holds, per block, the LIM score; per weight, the sensitivity alpha from noise injection
with its raw measurements; and, when measured, the relative quantization error of every candidate type.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import InputError
from ..imatrix import UNIT, ImportanceMatrix
from ..source.model import SourceModel

CALIBRATION_FORMAT = 1
IMATRIX_SUFFIX = ".imatrix.gguf"


def model_fingerprint(model: SourceModel) -> str:
    """Digest of the model's tensor names and shapes: a calibration is only valid for the model it measured."""
    digest = hashlib.sha256()
    for spec in model.specs:
        digest.update(f"{spec.name}:{'x'.join(map(str, spec.shape))};".encode())
    return digest.hexdigest()[:16]


@dataclass
class Sensitivity:
    """Noise injection into one weight: KL(base || noisy) per token at each relative noise size, and the fits.

    t2[k] = ||E||^2 / ||W||^2 (exactly the level asked for); t2_weighted[k] = sum_j a_j ||E_:j||^2 / sum_j a_j ||W_:j||^2
    with a_j the column's mean squared activation (the imatrix). alpha and alpha_weighted are least-squares slopes
    through the origin of kl against each, so that the predicted KL increase of an error is alpha * t2.
    """

    alpha: float
    alpha_weighted: float
    t2: list[float]
    t2_weighted: list[float]
    kl: list[float]


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
    sensitivity: dict[str, Sensitivity]        # GGUF weight name -> noise-injection measurement
    sensitivity_tokens: int
    noise_levels: list[float]
    seconds: dict[str, float] = field(default_factory=dict)
    # quantization errors: "plain" | "imatrix" -> weight -> type -> [t2, t2_weighted]
    errors: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    error_sample: int = 0                      # elements per weight the errors were measured on (0: all)
    imatrix: ImportanceMatrix = field(default_factory=ImportanceMatrix)

    def check_matches(self, model: SourceModel) -> None:
        if self.fingerprint != model_fingerprint(model):
            raise InputError(f"the calibration of '{self.model}' does not match this model (other tensor names or "
                             "shapes); run `ewq-gguf calibrate` on this model")

    def lim_scores(self) -> np.ndarray:
        return np.asarray(self.lim, dtype=np.float64)

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
        """Write PATH (JSON) and PATH's stem + .imatrix.gguf beside it; returns the JSON path."""
        path = Path(path)
        imatrix_path = imatrix_path_for(path)
        self.imatrix.save(imatrix_path)
        try:
            path.write_text(json.dumps(self.to_dict(imatrix_path.name), indent=1))
        except OSError as exc:
            raise InputError(f"{path}: cannot write the calibration ({exc})") from exc
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
            if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
                raise ValueError(f"calibration format {data.get('format') if isinstance(data, dict) else None!r}, "
                                 f"expected {CALIBRATION_FORMAT}")
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
