"""The measurements planners start from: an analysis of the weights (ewq, zd) or a calibration (lim, optimal), each
given as the object, as its JSON file, or for an analysis measured now."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..analyse import Analysis, analyze
from ..calibrate import Calibration
from ..errors import InputError
from ..source.model import SourceModel
from .registry import PlanContext, option


def analysis_option() -> Any:
    """The `analysis` option of the methods that rank blocks by a weight analysis."""
    return option(None, "An analysis JSON from `ewq-gguf analyze --json`, instead of reading the weights.", file=True,
                  default_text="analyse the weights now")


def calibration_option() -> Any:
    """The `calibration` option of the methods that plan from a calibration."""
    return option(None, "A calibration JSON from `ewq-gguf calibrate`.", file=True,
                  default_text="calibrate now on the default text")


def analysis_for(model: SourceModel, given: Optional[Analysis | str | Path], context: PlanContext) -> Analysis:
    """The analysis given (an Analysis or its JSON file), or one of `model` measured now."""
    if isinstance(given, Analysis):
        return given
    if given is not None:
        return Analysis.load(given)
    return analyze(model, device=context.device, progress=context.progress)


def calibration_for(given: Optional[Calibration | str | Path], method: str) -> Calibration:
    """The calibration given (a Calibration or its JSON file); InputError without one."""
    if given is None:
        raise InputError(f"--method {method} needs a calibration (--calibration FILE from `ewq-gguf calibrate`)")
    return given if isinstance(given, Calibration) else Calibration.load(given)
