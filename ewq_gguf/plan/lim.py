"""LIM planning (Dumitru et al., layer-wise quantization): the least important fraction of blocks go to the LOW type,
the rest to the MID type, importance being the block's LIM score from a calibration.

LIM_i = -mean over calibration tokens of cos(block input, block output): a block that leaves its input nearly
unchanged (LIM near -1) matters least, so the lowest scores go LOW. The count of LOW blocks is ZD's rule,
round(fraction x blocks), half up; equal scores keep block order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..calibrate import Calibration
from ..source.model import SourceModel
from .inputs import calibration_for, calibration_option
from .plan import Plan
from .registry import PlanContext, option, register_planner
from .tiers import TierOptions, TierTypes, tiered_plan
from .zd import least_important_first, zd_low_count

DEFAULT_FRACTION = 0.25


def lim_plan(model: SourceModel, calibration: Calibration, types: TierTypes, *, fraction: float = DEFAULT_FRACTION,
             embed_type: Optional[str] = None, output_type: Optional[str] = None) -> Plan:
    """The LIM plan of `model` from its calibration."""
    calibration.check_matches(model)
    scores = calibration.lim_scores()
    n_low = zd_low_count(fraction, len(scores))
    ranks = np.empty(len(scores), dtype=int)
    ranks[least_important_first(scores, "low-first")] = np.arange(len(scores))
    blocks = [{"block": index, "score": float(score), "rank": int(rank) + 1,
               "tier": "LOW" if rank < n_low else "MID",
               "why": f"LIM {score:.4f}, {rank + 1} of {len(scores)} least important"}
              for index, (score, rank) in enumerate(zip(scores, ranks))]
    params = {"fraction": fraction, "low_blocks": n_low, "calibration_text": calibration.text,
              "calibration_tokens": calibration.tokens}
    return tiered_plan(model, "lim", params, blocks, types, embed_type, output_type)


@dataclass(frozen=True)
class LimOptions(TierOptions):
    fraction: float = option(DEFAULT_FRACTION, "Fraction of blocks, those that change their input least (LIM), moved "
                                               "to the LOW type; the rest MID.", value_type=float)
    calibration: Optional[Calibration | str | Path] = calibration_option()


@register_planner("lim", LimOptions, help="the fraction of blocks that change their input least (LIM, from a "
                                          "calibration) LOW, the rest MID")
def make(model: SourceModel, options: LimOptions, context: PlanContext) -> Plan:
    types = TierTypes.parse(options.types)
    return lim_plan(model, calibration_for(options.calibration, "lim"), types, fraction=options.fraction,
                    embed_type=options.embed_type, output_type=options.output_type)
