"""ZD, the z-score distribution score of a block (Dumitru et al., layer-wise quantization).

Over all weights of a block's 2-D matrices pooled together, z = (w - mean) / std; ZD is the fraction with z > 1.
For a Gaussian it is about 0.159; heavier or skewed tails move it. The block's mean and std come from the first
pass's float64 sums (population std), and z > 1 is counted as w > mean + std in the second pass.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .entropy import BlockLayout, Moments, block_entropies, block_moments


def zd_threshold(moments: Sequence[Moments]) -> float:
    """mean + std of the pooled weights: an element above it has z > 1."""
    count = sum(stats.numel for stats in moments)
    mean = sum(stats.sum for stats in moments) / count
    variance = max(0.0, sum(stats.sum_squares for stats in moments) / count - mean * mean)
    std = math.sqrt(variance)
    # A constant block has no weight "much larger than average": nothing lies above the threshold.
    return mean + std if std > 0 else math.inf


def zd_score(tensors: Sequence[torch.Tensor]) -> float:
    """ZD of a block given as its weight matrices."""
    names = [f"matrix {index}" for index in range(len(tensors))]
    layout = BlockLayout(tensors)
    moments = block_moments(layout, names)
    matrices = block_entropies(layout, names, moments, zd_threshold(moments))
    return sum(matrix.above_threshold for matrix in matrices) / sum(stats.numel for stats in moments)
