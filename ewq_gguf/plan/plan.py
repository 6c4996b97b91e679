"""The Plan: the single contract between deciding and writing.

A plan names, for every tensor of the output file, the type that was asked for, the type it really gets (llama.cpp's
fallback when the row length does not fit), its exact byte size, and why. It serialises to JSON, prints as a table,
exports as a llama-quantize --tensor-type-file recipe, and is stored in the output's metadata (ewq.plan).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError

PLAN_FORMAT = 1

# llama-quantize reads each recipe name as an ECMAScript regular expression that it searches for in tensor names, and
# the first line that matches wins; these characters must be escaped to stand for themselves
_REGEX_SPECIAL = re.compile(r"[\\^$.|?*+()\[\]{}]")


def recipe_pattern(name: str) -> str:
    """A --tensor-type-file pattern that matches the tensor `name` and no other: escaped and anchored at both ends.

    Unanchored, an `output.weight` line would also claim every `blk.N.attn_output.weight` listed after it."""
    return "^" + _REGEX_SPECIAL.sub(lambda match: "\\" + match.group(), name) + "$"


@dataclass
class PlanEntry:
    name: str
    shape: list[int]
    requested: str
    type: str
    nbytes: int
    block: Optional[int] = None
    reason: str = ""
    predicted_kld: Optional[float] = None     # optimal plans: alpha x t2, the predicted KL increase (nats/token)

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def fell_back(self) -> bool:
        return self.requested != self.type


def _entry_dict(entry: PlanEntry) -> dict[str, Any]:
    """An entry as JSON; optional fields a method did not set are left out, so other plans stay as they were."""
    data = asdict(entry)
    if data["predicted_kld"] is None:
        del data["predicted_kld"]
    return data


@dataclass
class Plan:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    entries: list[PlanEntry] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)   # per-block scores and tiers, method-specific

    # --- sizes -------------------------------------------------------------------------------------------------
    @property
    def tensor_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    @property
    def n_params(self) -> int:
        return sum(entry.numel for entry in self.entries)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / max(1, self.n_params)

    def by_name(self) -> dict[str, PlanEntry]:
        return {entry.name: entry for entry in self.entries}

    def type_histogram(self) -> dict[str, int]:
        return dict(Counter(entry.type for entry in self.entries).most_common())

    def fallback_summary(self) -> str:
        """One line: how many tensors fell back from which requested type to which effective type."""
        moves = Counter((entry.requested, entry.type) for entry in self.entries if entry.fell_back)
        if not moves:
            return "no tensor fell back"
        parts = ", ".join(f"{count} {requested}->{effective}" for (requested, effective), count in sorted(moves.items()))
        return f"{sum(moves.values())} tensors fell back (row length not a multiple of the block size): {parts}"

    # --- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "method": self.method, "params": self.params, "blocks": self.blocks,
                "entries": [_entry_dict(entry) for entry in self.entries]}

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        try:
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"plan format {data.get('format')!r}, expected {PLAN_FORMAT}")
            entries = [PlanEntry(**entry) for entry in data["entries"]]
            return cls(data["method"], dict(data.get("params") or {}), entries, list(data.get("blocks") or []))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a valid ewq-gguf plan ({exc})") from exc

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"plan is not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """JSON plan, or for a .txt path a llama-quantize --tensor-type-file recipe."""
        path = Path(path)
        path.write_text(self.to_recipe() if path.suffix == ".txt" else self.to_json())

    def to_recipe(self) -> str:
        """`^name$=type` per matrix, for llama-quantize --tensor-type-file (with a quantized base type, since it
        applies the file only then). 1-D tensors are left out: llama-quantize never converts them."""
        lines = [f"{recipe_pattern(entry.name)}={entry.type.lower()}" for entry in self.entries
                 if len(entry.shape) >= 2]
        return "\n".join(lines) + "\n"

    # --- display -----------------------------------------------------------------------------------------------
    def table(self) -> str:
        """Per-tensor table (name, shape, requested -> effective type, bytes, why) and totals."""
        rows = [("tensor", "shape", "type", "bytes", "why")]
        for entry in self.entries:
            shown = entry.type if not entry.fell_back else f"{entry.requested}->{entry.type}"
            rows.append((entry.name, "x".join(map(str, entry.shape)), shown, f"{entry.nbytes:,}", entry.reason))
        widths = [max(len(row[col]) for row in rows) for col in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        if self.blocks:
            lines.append(self.blocks_table())
        lines.append(self.summary())
        return "\n".join(lines)

    def blocks_table(self) -> str:
        """Per-block decisions of a tiered method (EWQ, FastEWQ, ZD): block, score, tier, type, why."""
        rows = [("block", "score", "tier", "type", "why")]
        for block in self.blocks:
            score = block.get("score")
            rows.append((str(block.get("block", "")), "" if score is None else f"{score:.10g}",
                         str(block.get("tier", "")), str(block.get("type", "")), str(block.get("why", ""))))
        widths = [max(len(row[col]) for row in rows) for col in range(4)]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
                         for row in rows)

    def summary(self) -> str:
        histogram = ", ".join(f"{name} x{count}" for name, count in self.type_histogram().items())
        line = (f"plan {self.method}: {len(self.entries)} tensors, {self.tensor_bytes / 1e6:.2f} MB of tensor data, "
                f"{self.bits_per_weight:.3f} bits per weight ({histogram}); {self.fallback_summary()}")
        if self.params.get("predicted_kld") is not None:
            line += f"; predicted KLD {self.params['predicted_kld']:.4g}"
            if self.params.get("predicted_kld_90"):
                low, high = self.params["predicted_kld_90"]
                line += f" (90% over calibration sequences: {low:.4g}..{high:.4g})"
        return line
