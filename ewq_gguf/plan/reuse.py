"""Reusing a decision: a plan JSON written earlier, or the per-tensor types of an existing GGUF file.

Either way the types are re-applied to this checkpoint's tensors, so sizes and fallbacks are recomputed for it, and
a type we cannot encode (a published file's IQ2_XS) is refused here, before a dry run prints a size for it.
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType as QType

from ..errors import InputError
from ..gguf_file import read_gguf
from ..quant import CODECS, supported_names
from ..source.model import SourceModel
from .entries import entry_for
from .plan import Plan


def requested_types(path: Path) -> tuple[dict[str, QType], str]:
    """name -> requested type from a plan JSON or a GGUF file, and a label of where they came from."""
    if not path.is_file():
        raise InputError(f"plan file not found: {path}")
    if path.suffix == ".gguf":
        return {tensor.name: tensor.type for tensor in read_gguf(path).tensors}, f"types copied from {path.name}"
    plan = Plan.from_json(path.read_text())
    return {entry.name: entry.requested for entry in plan.entries}, f"plan {path.name} ({plan.method})"


def plan_from_file(model: SourceModel, path: str | Path) -> Plan:
    path = Path(path)
    types, origin = requested_types(path)
    missing = [spec.name for spec in model.specs if spec.name not in types]
    if missing:
        raise InputError(f"{path.name} names no type for {len(missing)} tensors of this model (first: {missing[0]}); "
                         "is it for another model?")
    entries = []
    for spec in model.specs:
        qtype = types[spec.name]
        if qtype not in CODECS:
            raise InputError(f"{path.name}: tensor '{spec.name}' has type {qtype.name}, which ewq-gguf cannot encode "
                             f"(it encodes {supported_names()})")
        entries.append(entry_for(spec, qtype, origin))
    return Plan("plan-file", {"source": path.name}, entries)
