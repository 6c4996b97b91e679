"""The public API. The CLI is a thin layer over these functions; they never print (progress goes to tqdm)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .device import resolve_device
from .errors import InputError
from .plan import Plan, uniform_plan
from .plan.reuse import plan_from_file
from .quant import parse_type
from .source.model import SourceModel, open_checkpoint
from .write import check_output, write_gguf

METHODS = ("uniform",)


@dataclass(frozen=True)
class ConvertResult:
    """What convert wrote (or, for a dry run, would write)."""

    path: Optional[Path]
    bytes: int
    bits_per_weight: float
    plan: Plan
    seconds: float


def make_plan(model: SourceModel, method: str = "uniform", *, type: str = "Q8_0", plan: Optional[str | Path] = None,
              **options: Any) -> Plan:
    """Decide the type of every tensor of `model` by `method`, or reuse a plan file / GGUF's types."""
    if plan is not None:
        return plan_from_file(model, plan)
    if method == "uniform":
        return uniform_plan(model, _type(type))
    raise InputError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def convert(model_dir: str | Path, out: str | Path, method: str = "uniform", *, type: str = "Q8_0",
            device: str = "auto", force: bool = False, plan: Optional[str | Path] = None,
            plan_out: Optional[str | Path] = None, dry_run: bool = False, progress: bool = True,
            **options: Any) -> ConvertResult:
    """Convert a Hugging Face checkpoint folder into a GGUF file at `out`."""
    started = time.perf_counter()
    out = Path(out)
    model = open_checkpoint(model_dir)
    if not dry_run:
        check_output(out, force)
    decided = make_plan(model, method, type=type, plan=plan, **options)
    if plan_out is not None:
        decided.save(plan_out)
    if dry_run:
        return ConvertResult(None, decided.tensor_bytes, decided.bits_per_weight, decided,
                             time.perf_counter() - started)
    written = write_gguf(model, decided, out, force=force, device=resolve_device(device), progress=progress)
    return ConvertResult(written.path, written.bytes, decided.bits_per_weight, decided, time.perf_counter() - started)


def _type(name: str):
    try:
        return parse_type(name)
    except ValueError as exc:
        raise InputError(str(exc)) from None
