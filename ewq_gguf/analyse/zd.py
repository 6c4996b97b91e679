"""ZD, the z-score distribution score of a block (Dumitru et al., layer-wise quantization).

Over all weights of a block's 2-D matrices pooled together, z = (w - mean) / std; ZD is the fraction with z > 1.
For a Gaussian it is about 0.159; heavier or skewed tails move it. The block's mean and std come from its matrices'
float64 moments (population std), and z > 1 is counted as w > mean + std with the entropies.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .entropy import Moments, block_statistics


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
    matrices = block_statistics(tensors, [f"matrix {index}" for index in range(len(tensors))], zd_threshold)
    return sum(matrix.above_threshold for matrix in matrices) / sum(matrix.numel for matrix in matrices)
