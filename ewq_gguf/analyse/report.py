"""An Analysis as a table and as a chart (returned or saved, never printed here)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EwqGgufError
from .analysis import Analysis


def format_analysis(analysis: Analysis, statistic: str, z: Sequence[float], tiers: Sequence[str],
                    types: Sequence[str]) -> str:
    """One row per block: parameters, softmax entropy raw and normalised, histogram entropy, the z-score of the
    ranked `statistic`, ZD, tier and type; then a summary line."""
    rows = [("block", "params", "softmax H", "H/log n", "hist bits", f"z({statistic})", "ZD", "tier", "type")]
    for block, z_value, tier, type_name in zip(analysis.blocks, z, tiers, types):
        rows.append((str(block.index), f"{block.params:,}", f"{block.softmax:.6f}", f"{block.softmax_normalized:.8f}",
                     f"{block.histogram:.4f}", f"{z_value:+.2f}", f"{block.zd:.4f}", tier, type_name))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) if col < 7 else cell.ljust(width)
                       for col, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    scores = analysis.scores(statistic)
    counts = Counter(tiers)
    lines.append(f"{analysis.model} ({analysis.architecture}): {analysis.n_blocks} blocks, "
                 f"{sum(analysis.block_params) / 1e6:.1f}M block weights analysed on {analysis.device} in "
                 f"{analysis.seconds:.1f} s; {statistic} mean {scores.mean():.6f}, std {scores.std():.6f}; "
                 + ", ".join(f"{tier} x{counts.get(tier, 0)}" for tier in ("LOW", "MID", "HIGH")))
    return "\n".join(lines)


def plot_analysis(analysis: Analysis, path: str | Path, statistic: str, tiers: Sequence[str]) -> None:
    """Save a PNG: the ranked statistic and ZD per block, points coloured by tier."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EwqGgufError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from exc
    index = np.arange(analysis.n_blocks)
    colours = {"LOW": "tab:red", "MID": "tab:orange", "HIGH": "tab:green"}
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(index, analysis.scores(statistic), color="grey", linewidth=0.8)
    top.scatter(index, analysis.scores(statistic), c=[colours[tier] for tier in tiers], zorder=3)
    top.set_ylabel(f"{statistic} entropy")
    top.set_title(f"{analysis.model}: block {statistic} entropy (red LOW, orange MID, green HIGH)")
    bottom.plot(index, analysis.scores("zd"), marker="o", color="tab:blue")
    bottom.set_ylabel("ZD (fraction z > 1)")
    bottom.set_xlabel("block")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
