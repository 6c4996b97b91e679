"""The Plan: the single contract between deciding and writing.

A plan names, for every tensor of the output file, the type that was asked for, the type it really gets (llama.cpp's
fallback when the row length does not fit), its exact byte size, and why. It is data only, immutable once made: it
serialises to JSON, exports as a llama-quantize --tensor-type-file recipe, and is stored in the output's metadata
(ewq.plan). plan/display.py prints it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gguf import GGMLQuantizationType as QType

from ..errors import InputError

PLAN_FORMAT = 1

# llama-quantize reads each recipe name as an ECMAScript regular expression that it searches for in tensor names, and
# the first line that matches wins; these characters must be escaped to stand for themselves
_REGEX_SPECIAL = re.compile(r"[\\^$.|?*+()\[\]{}]")


# The recipe's header comment for a file written with --rounding gptq. llama-quantize's --tensor-type-file has no
# comment syntax (it reads whitespace-separated `pattern=type` words), so the comment is such a word: a pattern
# with '#' in it, which no tensor name contains, so it never matches anything.
GPTQ_RECIPE_HEADER = ("#ewq-gguf:the_file_used_GPTQ_rounding,which_llama-quantize_cannot_reproduce:"
                      "it_applies_these_types_with_its_own_nearest_rounding=f32")


def recipe_pattern(name: str) -> str:
    """A --tensor-type-file pattern that matches the tensor `name` and no other: escaped and anchored at both ends.

    Unanchored, an `output.weight` line would also claim every `blk.N.attn_output.weight` listed after it."""
    return "^" + _REGEX_SPECIAL.sub(lambda match: "\\" + match.group(), name) + "$"


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    requested: QType
    type: QType
    nbytes: int
    block: Optional[int] = None
    reason: str = ""
    predicted_kld: Optional[float] = None     # optimal plans: alpha x t2, the predicted KL increase (nats/token)
    # how the codes were chosen: "nearest" (ggml's rounding) or "gptq" (error-compensating, see quant/gptq.py);
    # rounding_note says why a tensor of a --rounding gptq file kept nearest rounding
    rounding: str = "nearest"
    rounding_note: str = ""

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def fell_back(self) -> bool:
        return self.requested != self.type

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON, types by name; predicted_kld only when set, so other plans stay as they were."""
        data = {"name": self.name, "shape": list(self.shape), "requested": self.requested.name,
                "type": self.type.name, "nbytes": self.nbytes, "block": self.block, "reason": self.reason}
        if self.predicted_kld is not None:
            data["predicted_kld"] = self.predicted_kld
        if self.rounding != "nearest" or self.rounding_note:
            data["rounding"] = self.rounding
            data["rounding_note"] = self.rounding_note
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlanEntry":
        """An entry from its JSON; ValueError names a type that does not exist."""
        types = []
        for name in (data["requested"], data["type"]):
            if name not in QType.__members__:
                raise ValueError(f"tensor '{data['name']}': unknown type {name!r}")
            types.append(QType[name])
        return cls(data["name"], tuple(data["shape"]), *types, data["nbytes"], data.get("block"),
                   data.get("reason", ""), data.get("predicted_kld"), data.get("rounding", "nearest"),
                   data.get("rounding_note", ""))


@dataclass(frozen=True)
class Plan:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    entries: Sequence[PlanEntry] = ()                             # stored as a tuple
    blocks: list[dict[str, Any]] = field(default_factory=list)   # per-block scores and tiers, method-specific

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))

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

    def type_histogram(self) -> dict[QType, int]:
        """Tensors per effective type, most common first."""
        return dict(Counter(entry.type for entry in self.entries).most_common())

    # --- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "method": self.method, "params": self.params, "blocks": self.blocks,
                "entries": [entry.to_dict() for entry in self.entries]}

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        try:
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"plan format {data.get('format')!r}, expected {PLAN_FORMAT}")
            entries = [PlanEntry.from_dict(entry) for entry in data["entries"]]
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
        lines = [f"{recipe_pattern(entry.name)}={entry.type.name.lower()}" for entry in self.entries
                 if len(entry.shape) >= 2]
        if any(entry.rounding != "nearest" for entry in self.entries):
            lines.insert(0, GPTQ_RECIPE_HEADER)
        return "\n".join(lines) + "\n"
