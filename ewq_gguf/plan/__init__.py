"""PLAN: decide a GGUF type for every tensor. The Plan is the only thing the writer consumes."""
from .plan import Plan, PlanEntry
from .uniform import uniform_plan

__all__ = ["Plan", "PlanEntry", "uniform_plan"]
