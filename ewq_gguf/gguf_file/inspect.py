"""Read a GGUF file's summary back: metadata, type histogram, bits per weight and the ewq plan it records."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from ..constants import KEY_EWQ_PLAN
from ..errors import InputError
from ..plan import Plan


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a GGUF file (ours or anyone's)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/struct.error/... on malformed files
        raise InputError(f"{path}: not a readable GGUF file ({exc})") from exc
    n_params = sum(math.prod(int(d) for d in tensor.shape) for tensor in reader.tensors)
    tensor_bytes = sum(int(tensor.n_bytes) for tensor in reader.tensors)
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    metadata = {}
    for key in reader.fields:
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml.") and key not in (
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token") or key == KEY_EWQ_PLAN:
            continue
        value = field_value(reader, key)
        metadata[key] = value if not isinstance(value, str) or len(value) < 200 else value[:200] + "..."
    plan_json = field_value(reader, KEY_EWQ_PLAN)
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "architecture": field_value(reader, "general.architecture"),
        "tensors": len(reader.tensors),
        "parameters": n_params,
        "tensor_bytes": tensor_bytes,
        "bpw": 8 * tensor_bytes / max(1, n_params),
        "types": dict(types.most_common()),
        "metadata": metadata,
        "plan": json.loads(plan_json) if plan_json else None,
        "tensor_types": {tensor.name: tensor.tensor_type.name for tensor in reader.tensors},
    }


def format_inspection(summary: dict[str, Any]) -> str:
    lines = [f"{summary['file']}: {summary['architecture']}, {summary['tensors']} tensors, "
             f"{summary['parameters'] / 1e6:.1f}M parameters, {summary['bytes'] / 1e6:.2f} MB, "
             f"{summary['bpw']:.3f} bits per weight",
             "types: " + ", ".join(f"{name} x{count}" for name, count in summary["types"].items())]
    for key, value in summary["metadata"].items():
        lines.append(f"  {key} = {value}")
    if summary["plan"]:
        lines.append(Plan.from_dict(summary["plan"]).table())
    else:
        lines.append("no ewq plan recorded (not written by ewq-gguf)")
    return "\n".join(lines)
