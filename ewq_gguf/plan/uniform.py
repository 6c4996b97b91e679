"""Uniform plan: every 2-D weight gets the same type (what llama-quantize --pure does)."""
from __future__ import annotations

from gguf import GGMLQuantizationType as QType

from ..source.model import SourceModel
from .entries import entry_for
from .plan import Plan


def uniform_plan(model: SourceModel, qtype: QType) -> Plan:
    entries = [entry_for(spec, qtype, f"uniform {qtype.name}") for spec in model.specs]
    return Plan("uniform", {"type": qtype.name}, entries)
