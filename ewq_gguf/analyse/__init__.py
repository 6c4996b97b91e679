"""ANALYSE: per-block weight statistics (entropy, ZD) that the EWQ and ZD planners rank blocks by."""
from .analysis import ENTROPY_STATISTICS, STATISTICS, Analysis, BlockAnalysis, analyze, block_matrix_params
from .entropy import histogram_entropy, softmax_entropy
from .zd import zd_score

__all__ = ["Analysis", "BlockAnalysis", "ENTROPY_STATISTICS", "STATISTICS", "analyze", "block_matrix_params",
           "histogram_entropy", "softmax_entropy", "zd_score"]
