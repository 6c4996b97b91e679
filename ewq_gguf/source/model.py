"""The READ stage's one shape: a model as an ordered list of GGUF tensor specs plus a loader.

Every later stage sees only this: analysis and planning look at specs (names, shapes, blocks) and load tensors
one at a time; writing streams them. A checkpoint folder and (later) a live transformers model both provide it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import gguf
import torch

from ..arch.base import Adapter
from ..arch.registry import adapter_for
from ..errors import InputError
from .checkpoint import Checkpoint
from .safetensors_header import FLOAT_DTYPES

_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output file, before any type is chosen for it."""

    name: str                 # GGUF name, e.g. blk.3.attn_q.weight
    shape: tuple[int, ...]    # numpy order: the last dimension is the row (GGUF ne[0])
    source: str               # checkpoint tensor name, or "computed"
    source_dtype: str         # F32 / F16 / BF16 of the stored data

    @property
    def block(self) -> Optional[int]:
        match = _BLOCK.match(self.name)
        return int(match.group(1)) if match else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        """2-D weights get the planned type; 1-D tensors (norms, biases) stay F32 as llama.cpp expects."""
        return len(self.shape) >= 2


class SourceModel:
    """A model to convert: config, adapter, specs in output order, and tensor loading (transform applied)."""

    def __init__(self, config: dict[str, Any], adapter: Adapter, specs: list[TensorSpec],
                 load_source: Callable[[str], torch.Tensor], extra: dict[str, Callable[[], torch.Tensor]],
                 add_tokenizer: Callable[[gguf.GGUFWriter], None], name: str):
        self.config = config
        self.adapter = adapter
        self.specs = specs
        self.name = name
        self._load_source = load_source
        self._extra = extra
        self._add_tokenizer = add_tokenizer
        self.by_name = {spec.name: spec for spec in specs}

    @property
    def n_blocks(self) -> int:
        return self.adapter.n_blocks

    def load(self, spec: TensorSpec) -> torch.Tensor:
        """The tensor's values as llama.cpp expects them, in the stored dtype (not yet upcast)."""
        if spec.source == "computed":
            return self._extra[spec.name]()
        return self.adapter.transform(spec.name, self._load_source(spec.source))

    def add_metadata(self, writer: gguf.GGUFWriter) -> None:
        writer.add_name(self.name)
        self.adapter.add_metadata(writer)
        self._add_tokenizer(writer)


def specs_from_records(adapter: Adapter, records: list[tuple[str, str, tuple[int, ...]]]) -> tuple[
        list[TensorSpec], dict[str, Callable[[], torch.Tensor]]]:
    """Specs for (hf name, dtype, shape) records, in llama.cpp's usual order: non-block tensors first, then blocks."""
    specs = []
    for hf_name, dtype, shape in records:
        name = adapter.gguf_name(hf_name)
        if name is None:
            continue
        if dtype not in FLOAT_DTYPES:
            raise InputError(f"tensor '{hf_name}' is stored as {dtype}; only float checkpoints can be converted")
        specs.append(TensorSpec(name, tuple(shape), hf_name, dtype))
    extra = {}
    for tensor in adapter.extra_tensors():
        specs.append(TensorSpec(tensor.name, tensor.shape, "computed", "F32"))
        extra[tensor.name] = tensor.make
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise InputError(f"two checkpoint tensors map to GGUF tensor '{spec.name}'")
        seen.add(spec.name)
    specs.sort(key=lambda spec: (spec.block is not None, spec.block or 0))
    return specs, extra


def open_checkpoint(model_dir: str | Path) -> SourceModel:
    """Open a Hugging Face checkpoint folder: reads config.json and safetensors headers only."""
    from ..tokenizer import add_tokenizer

    checkpoint = Checkpoint(model_dir)
    adapter = adapter_for(checkpoint.config)
    records = [(record.name, record.dtype, record.shape) for record in checkpoint]
    specs, extra = specs_from_records(adapter, records)
    model_dir = Path(model_dir)

    def tokenizer(writer: gguf.GGUFWriter) -> None:
        add_tokenizer(writer, model_dir, checkpoint.config)

    return SourceModel(checkpoint.config, adapter, specs, checkpoint.load, extra, tokenizer,
                       name=model_dir.resolve().name)
