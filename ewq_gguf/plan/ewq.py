"""EWQ, entropy-weighted quantization: a block's precision follows its weight entropy relative to the others.

With mu and sigma the mean and (population) standard deviation of the block entropies and k a factor (default 0.65):
  entropy >= mu                 -> HIGH
  mu - k sigma <= entropy < mu  -> MID
  entropy < mu - k sigma        -> LOW
That is EWQ's direction (low entropy tolerates low precision), `--direction low-first`. `high-first` mirrors it:
the highest-entropy blocks go LOW (entropy > mu + k sigma), those in (mu, mu + k sigma] MID, the rest HIGH.
Measurements on our development models (docs/results.md) found the better direction differs between models.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..analyse import ENTROPY_STATISTICS, Analysis
from ..errors import InputError
from ..source.model import SourceModel
from .inputs import analysis_for, analysis_option
from .plan import Plan
from .registry import PlanContext, option, register_planner
from .tiers import DIRECTIONS, TierOptions, TierTypes, check_direction, tiered_plan

DEFAULT_K = 0.65
DEFAULT_ENTROPY = "softmax"
DEFAULT_DIRECTION = "low-first"


def z_scores(scores: Sequence[float]) -> np.ndarray:
    """(score - mu) / sigma per block; zeros when every block scores the same."""
    values = np.asarray(scores, dtype=np.float64)
    sigma = values.std()
    return (values - values.mean()) / sigma if sigma > 0 else np.zeros_like(values)


def ewq_tiers(scores: Sequence[float], k: float = DEFAULT_K, direction: str = DEFAULT_DIRECTION) -> list[str]:
    """The tier of each block from its entropy, by the mu / k sigma thresholds above."""
    if k < 0:
        raise InputError(f"--k must be >= 0, got {k}")
    values = np.asarray(scores, dtype=np.float64)
    if check_direction(direction) == "high-first":
        values = -values   # negation is exact, so the mirrored thresholds are exactly the mirrored tiers
    mu, sigma = values.mean(), values.std()
    return ["HIGH" if value >= mu else "MID" if value >= mu - k * sigma else "LOW" for value in values]


def check_entropy(entropy: str) -> str:
    if entropy not in ENTROPY_STATISTICS:
        raise InputError(f"unknown entropy '{entropy}' (choose from {', '.join(ENTROPY_STATISTICS)})")
    return entropy


def ewq_plan(model: SourceModel, analysis: Analysis, types: TierTypes, *, k: float = DEFAULT_K,
             entropy: str = DEFAULT_ENTROPY, direction: str = DEFAULT_DIRECTION,
             embed_type: Optional[str] = None, output_type: Optional[str] = None) -> Plan:
    """The EWQ plan of `model` from its analysis."""
    analysis.check_matches(model)
    scores = analysis.scores(check_entropy(entropy))
    tiers = ewq_tiers(scores, k, direction)
    z = z_scores(scores)
    unit = "nats" if entropy == "softmax" else "bits"
    blocks = [{"block": block.index, "params": block.params, "score": float(score), "z": float(z_value),
               "softmax": block.softmax, "softmax_normalized": block.softmax_normalized,
               "histogram": block.histogram, "zd": block.zd, "tier": tier,
               "why": f"{entropy} entropy {score:.6f} {unit}, z {z_value:+.2f}"}
              for block, score, z_value, tier in zip(analysis.blocks, scores, z, tiers)]
    params = {"entropy": entropy, "k": k, "direction": direction, "mu": float(scores.mean()),
              "sigma": float(scores.std()), "analysis_device": analysis.device}
    return tiered_plan(model, "ewq", params, blocks, types, embed_type, output_type)


@dataclass(frozen=True)
class EwqOptions(TierOptions):
    k: float = option(DEFAULT_K, "Blocks below mean - k*std of entropy go LOW, below the mean MID, the rest HIGH.",
                      value_type=float)
    entropy: str = option(DEFAULT_ENTROPY, "Entropy blocks are ranked by: softmax (nats) or 128-bin histogram "
                                           "(bits).", choices=ENTROPY_STATISTICS)
    direction: str = option(DEFAULT_DIRECTION, "Which end of the entropy goes to the LOW type (low-first: EWQ's, low "
                                               "entropy -> low precision).", choices=DIRECTIONS)
    analysis: Optional[Analysis | str | Path] = analysis_option()


@register_planner("ewq", EwqOptions, help="entropy tiers: each block's weight entropy against the others' (reads the "
                                          "weights)")
def make(model: SourceModel, options: EwqOptions, context: PlanContext) -> Plan:
    types = TierTypes.parse(options.types)    # before the analysis: a mistyped type fails at once
    return ewq_plan(model, analysis_for(model, options.analysis, context), types, k=options.k,
                    entropy=options.entropy, direction=options.direction, embed_type=options.embed_type,
                    output_type=options.output_type)
