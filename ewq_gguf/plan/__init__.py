"""PLAN: decide a GGUF type for every tensor. The Plan is the only thing the writer consumes."""
from .plan import Plan, PlanEntry

__all__ = ["Plan", "PlanEntry"]
