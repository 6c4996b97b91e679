"""Uniform plan: every 2-D weight gets the same type (what llama-quantize --pure does)."""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QType

from ..source.model import SourceModel
from .entries import entry_for
from .plan import Plan
from .registry import PlanContext, option, register_planner
from .tiers import type_named


def uniform_plan(model: SourceModel, qtype: QType) -> Plan:
    entries = [entry_for(spec, qtype, f"uniform {qtype.name}") for spec in model.specs]
    return Plan("uniform", {"type": qtype.name}, entries)


@dataclass(frozen=True)
class UniformOptions:
    type: str = option("Q8_0", "Type of every 2-D weight; 1-D tensors stay F32.")


@register_planner("uniform", UniformOptions, help="one type for every 2-D weight (reads no weight to decide)")
def make(model: SourceModel, options: UniformOptions, context: PlanContext) -> Plan:
    return uniform_plan(model, type_named(options.type))
