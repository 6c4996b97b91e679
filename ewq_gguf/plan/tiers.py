"""Block tiers (LOW / MID / HIGH) and the plan they make, shared by the EWQ, FastEWQ and ZD planners.

Each planner decides one tier per transformer block; every 2-D weight of the block gets that tier's type (or
llama.cpp's fallback for it). Tensors outside the blocks are not ranked:

- the token embedding gets --embed-type (default Q8_0) and the output head --output-type (default Q8_0): near
  lossless at 8.5 bits per weight, the choice llama.cpp's own mixes never go below for small models' output
  (a tied model's embedding is also its output head);
- any other 2-D tensor outside the blocks gets the MID type; 1-D tensors stay F32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from gguf import GGMLQuantizationType as QType

from ..constants import DEFAULT_EMBED_TYPE, DEFAULT_OUTPUT_TYPE, DEFAULT_TIER_TYPES, OUTPUT_HEAD, TOKEN_EMBEDDING
from ..errors import InputError
from ..quant import parse_type
from ..source.model import SourceModel
from .entries import entry_for
from .plan import Plan
from .registry import option

TIERS = ("LOW", "MID", "HIGH")
# Which end of a block score goes to the LOW type: EWQ's reading is "low entropy tolerates low precision".
DIRECTIONS = ("low-first", "high-first")


def type_named(name: str) -> QType:
    try:
        return parse_type(name)
    except ValueError as exc:
        raise InputError(str(exc)) from None


@dataclass(frozen=True)
class TierTypes:
    """The GGUF type of each tier, from a `LOW,MID,HIGH` list such as Q4_K,Q8_0,F16."""

    low: QType
    mid: QType
    high: QType

    @classmethod
    def parse(cls, text: str | Sequence[str]) -> "TierTypes":
        names = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
        if len(names) != 3:
            raise InputError(f"--types needs three types LOW,MID,HIGH (e.g. {DEFAULT_TIER_TYPES}), got {text!r}")
        return cls(*(type_named(name) for name in names))

    def of(self, tier: str) -> QType:
        return {"LOW": self.low, "MID": self.mid, "HIGH": self.high}[tier]

    def names(self) -> list[str]:
        return [self.low.name, self.mid.name, self.high.name]


@dataclass(frozen=True)
class TierOptions:
    """The options of every method that decides one tier per block; each method's options extend these."""

    types: str = option(DEFAULT_TIER_TYPES, "Tier types LOW,MID,HIGH.")
    embed_type: str = option(DEFAULT_EMBED_TYPE, "Type of the token embedding (also the output head of tied models).")
    output_type: str = option(DEFAULT_OUTPUT_TYPE, "Type of the output head.")


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"unknown direction '{direction}' (choose from {', '.join(DIRECTIONS)})")
    return direction


def tiered_plan(model: SourceModel, method: str, params: dict[str, Any], blocks: list[dict[str, Any]],
                types: TierTypes, embed_type: Optional[str] = None, output_type: Optional[str] = None) -> Plan:
    """The plan for one decided tier per block. `blocks[i]` describes block i and holds at least "tier" and
    "why" (the reason recorded on its tensors); "type" is added here. Plan.blocks keeps every other key."""
    if len(blocks) != model.n_blocks:
        raise InputError(f"{len(blocks)} block decisions for a model of {model.n_blocks} blocks")
    embed = type_named(embed_type or DEFAULT_EMBED_TYPE)
    output = type_named(output_type or DEFAULT_OUTPUT_TYPE)
    recorded = []
    for block in blocks:
        if block["tier"] not in TIERS:
            raise InputError(f"unknown tier {block['tier']!r} for block {block.get('block')}")
        recorded.append({**block, "type": types.of(block["tier"]).name})
    entries = []
    for spec in model.specs:
        if spec.block is not None:
            decision = recorded[spec.block]
            entries.append(entry_for(spec, types.of(decision["tier"]), f"{decision['tier']}: {decision['why']}"))
        elif spec.name == TOKEN_EMBEDDING:
            entries.append(entry_for(spec, embed, f"token embedding: --embed-type {embed.name}"))
        elif spec.name == OUTPUT_HEAD:
            entries.append(entry_for(spec, output, f"output head: --output-type {output.name}"))
        else:
            entries.append(entry_for(spec, types.mid, "outside the blocks: MID type"))
    full_params = {**params, "types": types.names(), "embed_type": embed.name, "output_type": output.name}
    return Plan(method, full_params, entries, recorded)
