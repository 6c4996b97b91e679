"""Sensitivity of the model's output to noise in one weight (the linearity theorem's alpha, see plan/optimal.py).

For a weight W, Gaussian noise E scaled to ||E|| = t ||W|| exactly is added, the model runs on the sensitivity
tokens, and the mean KL(base || noisy) per token is measured, for each noise level t. The slope of KL against t^2
(least squares through the origin: KL is 0 without noise) is alpha: an error of relative size t^2 costs about
alpha * t^2 nats of KL per token, whatever its source, as long as it is small and noise-like.

Granularity: one alpha per weight (per tensor), because the optimal planner chooses a type per tensor and tensors of
one block differ in sensitivity by orders of magnitude. What keeps this affordable: the base log-probabilities and
every block's input are cached once, so a measurement on a weight of block b runs blocks b.. and the head only; the
same tokens serve every weight (common random numbers: the errors of the token sample are shared, so the
comparison between weights is sharper than each value); one noise draw per weight, seeded by its name, scaled to
each level. The token embedding's noise reaches the output through block 0 (and, when tied, through the head too).
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..progress import progress_bar
from .calibration import Sensitivity
from .runner import ModelRunner, Weight, kl_per_token


def slope_through_origin(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y = slope * x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    denominator = float((x * x).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def noise_like(weight: torch.Tensor, name: str) -> torch.Tensor:
    """Standard Gaussian noise of the weight's shape, the same for the same name on every run."""
    generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode()))
    return torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


def weighted_ratio(delta: torch.Tensor, weight: torch.Tensor, importance: Optional[torch.Tensor]) -> float:
    """sum_j a_j ||delta_:j||^2 / sum_j a_j ||W_:j||^2 over input columns j (plain ratio without importance); with
    one importance vector per expert (a 3-D weight's), each expert's columns weighted by its own."""
    width = delta.shape[-1]
    if importance is None:
        return float(delta.double().pow(2).sum() / weight.double().pow(2).sum())
    importance = importance.to(device=delta.device, dtype=torch.float64).reshape(-1, width)
    delta_columns = delta.double().pow(2).reshape(importance.shape[0], -1, width).sum(1)
    weight_columns = weight.double().pow(2).reshape(importance.shape[0], -1, width).sum(1)
    return float((importance * delta_columns).sum() / (importance * weight_columns).sum())


def measure_sensitivities(runner: ModelRunner, ids: torch.Tensor, levels: Sequence[float],
                          importance: Callable[[str], Optional[torch.Tensor]], progress: bool = True,
                          weights: Optional[Sequence[Weight]] = None) -> dict[str, Sensitivity]:
    """Noise-injection sensitivity of every weight (or of `weights`) on the token batch `ids` (sequences, tokens)."""
    block_outputs, base = runner.block_inputs(ids)
    results = {}
    chosen = list(runner.weights if weights is None else weights)
    for weight in progress_bar(chosen, desc="sensitivity", unit="weight", enabled=progress):
        parameter = weight.parameter
        original = parameter.detach().clone()
        own = weight.in_file_layout(original)      # the weight's elements (of a fused parameter: its part)
        if not bool(own.any()):
            # an all-zero weight has no relative noise to add (and quantizes exactly): no sensitivity
            results[weight.name] = Sensitivity(0.0, 0.0, [0.0] * len(levels), [0.0] * len(levels), [0.0] * len(levels))
            continue
        noise = noise_like(original, weight.name)
        mask = weight.mask()
        if mask is not None:
            noise *= mask                                    # the parameter's other weights keep their values
        noise *= own.float().norm() / noise.norm()           # relative size exactly 1; scaled per level below
        column_weights = importance(weight.name)
        t2, t2_weighted, kl = [], [], []
        try:
            for level in levels:
                delta = (noise * level).to(original.dtype)
                parameter.data.copy_(original + delta)
                logits = runner.suffix_logits(ids, weight.start, block_outputs)
                kl.append(float(kl_per_token(base, logits).mean()))
                own_delta = weight.in_file_layout(delta)
                t2.append(weighted_ratio(own_delta, own, None))
                t2_weighted.append(weighted_ratio(own_delta, own, column_weights))
        finally:
            parameter.data.copy_(original)
        results[weight.name] = Sensitivity(alpha=slope_through_origin(t2, kl),
                                           alpha_weighted=slope_through_origin(t2_weighted, kl),
                                           t2=t2, t2_weighted=t2_weighted, kl=kl)
    return results
