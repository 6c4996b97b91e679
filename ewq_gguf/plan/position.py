"""Position planning: the last fraction of the blocks go to the LOW type, the rest to the MID type.

It reads no weight and needs no calibration: depth alone decides, a baseline for the measured methods. The count of
LOW blocks is ZD's rule, round(fraction x blocks), half up.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..source.model import SourceModel
from .plan import Plan
from .registry import PlanContext, option, register_planner
from .tiers import TierOptions, TierTypes, tiered_plan
from .zd import zd_low_count


@dataclass(frozen=True)
class PositionOptions(TierOptions):
    fraction: float = option(0.25, "Fraction of blocks, the last ones, moved to the LOW type; the rest MID.",
                             value_type=float)


@register_planner("position", PositionOptions, help="the last fraction of blocks LOW, the rest MID (reads no weight)")
def make(model: SourceModel, options: PositionOptions, context: PlanContext) -> Plan:
    types = TierTypes.parse(options.types)
    n_blocks = model.n_blocks
    n_low = zd_low_count(options.fraction, n_blocks)
    first_low = n_blocks - n_low
    blocks = [{"block": index, "tier": "LOW" if index >= first_low else "MID",
               "why": f"block {index + 1} of {n_blocks}; the last {n_low} go LOW"} for index in range(n_blocks)]
    params = {"fraction": options.fraction, "low_blocks": n_low}
    return tiered_plan(model, "position", params, blocks, types, options.embed_type, options.output_type)
