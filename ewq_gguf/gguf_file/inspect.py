"""Read a GGUF file's summary back: metadata, type histogram, bits per weight and the ewq plan it records."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from gguf.constants import Keys

from ..constants import KEY_EWQ_PLAN
from ..plan import Plan
from ..plan.display import format_plan
from .read import read_gguf

# The tokenizer's scalars worth showing; its arrays (tokens, merges, scores) would drown the summary.
SHOWN_TOKENIZER_KEYS = (Keys.Tokenizer.MODEL, Keys.Tokenizer.PRE, Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID,
                        Keys.Tokenizer.ADD_BOS)


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a GGUF file (ours or anyone's)."""
    gguf = read_gguf(path)
    n_params = sum(tensor.n_elements for tensor in gguf.tensors)
    tensor_bytes = sum(tensor.n_bytes for tensor in gguf.tensors)
    types = Counter(tensor.type_name for tensor in gguf.tensors)
    metadata = {}
    for key in gguf.metadata:
        if key.startswith("tokenizer.ggml.") and key not in SHOWN_TOKENIZER_KEYS or key == KEY_EWQ_PLAN:
            continue
        value = gguf.value(key)
        metadata[key] = value if not isinstance(value, str) or len(value) < 200 else value[:200] + "..."
    plan_json = gguf.metadata.get(KEY_EWQ_PLAN)
    return {
        "file": str(gguf.path),
        "bytes": gguf.file_size,
        "architecture": gguf.metadata.get(Keys.General.ARCHITECTURE),
        "tensors": len(gguf.tensors),
        "parameters": n_params,
        "tensor_bytes": tensor_bytes,
        "bpw": 8 * tensor_bytes / max(1, n_params),
        "types": dict(types.most_common()),
        "metadata": metadata,
        "plan": json.loads(plan_json) if plan_json else None,
        "tensor_types": {tensor.name: tensor.type_name for tensor in gguf.tensors},
    }


def format_inspection(summary: dict[str, Any]) -> str:
    lines = [f"{summary['file']}: {summary['architecture']}, {summary['tensors']} tensors, "
             f"{summary['parameters'] / 1e6:.1f}M parameters, {summary['bytes'] / 1e6:.2f} MB, "
             f"{summary['bpw']:.3f} bits per weight",
             "types: " + ", ".join(f"{name} x{count}" for name, count in summary["types"].items())]
    for key, value in summary["metadata"].items():
        lines.append(f"  {key} = {value}")
    if summary["plan"]:
        lines.append(format_plan(Plan.from_dict(summary["plan"])))
    else:
        lines.append("no ewq plan recorded (not written by ewq-gguf)")
    return "\n".join(lines)
