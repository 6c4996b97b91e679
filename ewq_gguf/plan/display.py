"""A plan as text: the per-tensor table, the per-block decisions of the tiered methods, and the one-line summary."""
from __future__ import annotations

from collections import Counter

from .plan import Plan


def format_plan(plan: Plan) -> str:
    """Per-tensor table (name, shape, requested -> effective type, bytes, why), per-block decisions, summary."""
    rows = [("tensor", "shape", "type", "bytes", "why")]
    for entry in plan.entries:
        shown = entry.type.name if not entry.fell_back else f"{entry.requested.name}->{entry.type.name}"
        rows.append((entry.name, "x".join(map(str, entry.shape)), shown, f"{entry.nbytes:,}", entry.reason))
    lines = [_aligned(rows)]
    if plan.blocks:
        lines.append(_blocks_table(plan))
    lines.append(format_plan_summary(plan))
    return "\n".join(lines)


def format_plan_summary(plan: Plan) -> str:
    """One line: method, tensors, size, bits per weight, types, fallbacks and the predicted KL divergence."""
    histogram = ", ".join(f"{qtype.name} x{count}" for qtype, count in plan.type_histogram().items())
    line = (f"plan {plan.method}: {len(plan.entries)} tensors, {plan.tensor_bytes / 1e6:.2f} MB of tensor data, "
            f"{plan.bits_per_weight:.3f} bits per weight ({histogram}); {_fallbacks(plan)}")
    if plan.params.get("predicted_kld") is not None:
        line += f"; predicted KLD {plan.params['predicted_kld']:.4g}"
        if plan.params.get("predicted_kld_90"):
            low, high = plan.params["predicted_kld_90"]
            line += f" (90% over calibration sequences: {low:.4g}..{high:.4g})"
    rounding = _rounding(plan)
    if rounding:
        line += f"; {rounding}"
    return line


def _rounding(plan: Plan) -> str:
    """With GPTQ rounding: how many tensors got it and how many kept nearest rounding, and why (empty otherwise)."""
    if all(entry.rounding == "nearest" and not entry.rounding_note for entry in plan.entries):
        return ""
    gptq = sum(entry.rounding == "gptq" for entry in plan.entries)
    kept = Counter(entry.rounding_note for entry in plan.entries if entry.rounding != "gptq" and entry.rounding_note)
    parts = ", ".join(f"{count} {note}" for note, count in sorted(kept.items(), key=lambda item: -item[1]))
    return f"GPTQ rounding on {gptq} tensors" + (f", nearest kept on {sum(kept.values())} ({parts})" if kept else "")


def _blocks_table(plan: Plan) -> str:
    """Per-block decisions of a tiered method (EWQ, FastEWQ, ZD, ...): block, score, tier, type, why."""
    rows = [("block", "score", "tier", "type", "why")]
    for block in plan.blocks:
        score = block.get("score")
        rows.append((str(block.get("block", "")), "" if score is None else f"{score:.10g}",
                     str(block.get("tier", "")), str(block.get("type", "")), str(block.get("why", ""))))
    return _aligned(rows)


def _aligned(rows: list[tuple[str, str, str, str, str]]) -> str:
    """Rows of five cells: the first four padded to their column's width, the last (the reason) as it is."""
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
                     for row in rows)


def _fallbacks(plan: Plan) -> str:
    """How many tensors fell back from which requested type to which effective type."""
    moves = Counter((entry.requested.name, entry.type.name) for entry in plan.entries if entry.fell_back)
    if not moves:
        return "no tensor fell back"
    parts = ", ".join(f"{count} {requested}->{effective}" for (requested, effective), count in sorted(moves.items()))
    return f"{sum(moves.values())} tensors fell back (row length not a multiple of the block size): {parts}"
