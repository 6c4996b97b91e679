"""The READ stage's one shape: a model as an ordered list of GGUF tensor specs plus a loader.

Every later stage sees only this: analysis and planning look at specs (names, shapes, blocks) and load tensors
one at a time; writing streams them. Three routes provide it: a checkpoint folder through our adapters
(open_checkpoint, here), the same folder through llama.cpp's converter (converter.open_converted), and a live
transformers or PEFT model in memory (live.open_live).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import gguf
import torch

from ..arch.base import Adapter
from ..arch.registry import adapter_for, has_adapter
from ..constants import TOKEN_EMBEDDING
from ..errors import InputError
from .checkpoint import Checkpoint
from .safetensors_header import FLOAT_DTYPES

_BLOCK = re.compile(r"^blk\.(\d+)\.")
# llama.cpp's LLAMA_MAX_LAYERS; also keeps a lying layer count from building a name table of millions of entries
MAX_BLOCKS = 512
MAX_DIMS = 4            # GGUF tensors have at most 4 dimensions

# config.json keys the adapters read as counts (positive integers) or as positive numbers; checked up front so that
# a wrong value is reported by name instead of failing somewhere inside an adapter. GGUF stores counts as uint32 and
# these numbers as float32, hence the upper bounds.
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
MAX_COUNT = 2**31 - 1
MAX_NUMBER = 3.4e38
COUNT_KEYS = ("num_hidden_layers", "n_layer", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "n_ctx", "head_dim", "sliding_window",
              "original_max_position_embeddings", "sliding_window_pattern")
NUMBER_KEYS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping", "partial_rotary_factor")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output file, before any type is chosen for it."""

    name: str                 # GGUF name, e.g. blk.3.attn_q.weight
    shape: tuple[int, ...]    # numpy order: the last dimension is the row (GGUF ne[0])
    source: str               # checkpoint tensor name, or "computed"
    source_dtype: str         # F32 / F16 / BF16 of the stored data
    keeps_float: bool = False  # llama.cpp stores it in F32 in every file type (a MoE router, a convolution)

    @property
    def block(self) -> Optional[int]:
        match = _BLOCK.match(self.name)
        return int(match.group(1)) if match else None

    @property
    def role(self) -> str:
        """The name without its block number (blk.#.attn_q.weight): what the tensors of every block share."""
        return _BLOCK.sub("blk.#.", self.name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        """Weights of 2 or more dimensions get the planned type; 1-D tensors (norms, biases) and those llama.cpp
        keeps in float stay F32 as llama.cpp expects."""
        return len(self.shape) >= 2 and not self.keeps_float


class SourceModel:
    """A model to convert: config, adapter, specs in output order, and tensor loading (transform applied)."""

    def __init__(self, config: dict[str, Any], adapter: Adapter, specs: list[TensorSpec],
                 load_source: Callable[[TensorSpec], torch.Tensor], extra: dict[str, Callable[[], torch.Tensor]],
                 add_tokenizer: Callable[[gguf.GGUFWriter], None], name: str,
                 relayout: Optional[Callable[[TensorSpec, Mapping[str, torch.Tensor]], torch.Tensor]] = None):
        self.config = config
        self.adapter = adapter
        self.specs = specs
        self.name = name
        self._load_source = load_source
        self._relayout = relayout
        self._extra = extra
        self._add_tokenizer = add_tokenizer
        self.by_name = {spec.name: spec for spec in specs}

    @property
    def n_blocks(self) -> int:
        return self.adapter.n_blocks

    def load(self, spec: TensorSpec) -> torch.Tensor:
        """The tensor's values as llama.cpp expects them, in the stored dtype (not yet upcast)."""
        with config_errors():
            if spec.source == "computed":
                return self._extra[spec.name]()
            return self.adapter.transform(spec.name, self._load_source(spec))

    def file_layout(self, spec: TensorSpec, pieces: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What load(spec) would give were the checkpoint tensors it is made of `pieces` (checkpoint name -> a tensor
        of that tensor's shape): the reading route's moves and scales applied to other values."""
        with config_errors():
            if self._relayout is not None:
                return self._relayout(spec, pieces)
            return self.adapter.transform(spec.name, pieces[spec.source])

    def element_sources(self, spec: TensorSpec, shapes: Mapping[str, tuple[int, ...]],
                        ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(index, factor), both shaped like the file's tensor `spec`: its element e is element index[e] of the
        checkpoint tensors `shapes` (flattened, end to end) times factor[e], where the route moves and scales single
        elements (transposes, interleaves, splits, stacks, permutes) and computes nothing else; None otherwise.
        Found by pushing numbered elements through file_layout."""
        total = sum(math.prod(shape) for shape in shapes.values())
        low = 2048     # elements numbered as high * low + low part: both exact in float32 up to 2^35 elements
        # float32 and (below 2^31 elements) int32 throughout: the probes are as large as the tensor, and a stacked
        # expert tensor has hundreds of millions of elements. The division below is exact where the route moves
        # elements or scales them by powers of two; other factors can miss the 0.25 check on large tensors (None),
        # as the route's own float32 product of a number already could
        index_dtype = torch.int32 if total < 2**31 - low else torch.int64

        def numbered(part: Optional[int]) -> torch.Tensor:
            pieces, offset = {}, 0
            for stored, shape in shapes.items():
                count = math.prod(shape)
                if part is None:
                    values = torch.ones(count, dtype=torch.float32)
                else:
                    index = torch.arange(offset, offset + count, dtype=index_dtype)
                    values = (index % low if part == 0 else index // low).add_(1).to(torch.float32)
                    del index
                pieces[stored] = values.reshape(shape)
                offset += count
            return self.file_layout(spec, pieces).float()

        factor = numbered(None)
        if tuple(factor.shape) != tuple(spec.shape) or not bool((factor != 0).all() and torch.isfinite(factor).all()):
            return None
        parts = []
        for part in (0, 1):
            numbers = numbered(part).div_(factor)
            rounded = numbers.round()
            if not bool(torch.isfinite(numbers).all()) or float(numbers.sub_(rounded).abs_().max()) > 0.25:
                return None
            del numbers
            parts.append(rounded.to(index_dtype).sub_(1))
            del rounded
        low_part, high_part = parts
        if int(low_part.min()) < 0 or int(low_part.max()) >= low or int(high_part.min()) < 0 \
                or int(high_part.max()) > (total - 1) // low:
            return None
        index = high_part.mul_(low).add_(low_part)     # below `total` now, which index_dtype holds
        del low_part
        if int(index.max()) >= total:
            return None
        return index, factor

    def element_layout(self, spec: TensorSpec, shapes: Mapping[str, tuple[int, ...]],
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Where the rows and columns of the file's tensor `spec` come from: (row_of, column_of), its row i (of all
        but the last dimension) being row row_of[i] of the checkpoint tensors `shapes` with their rows end to end,
        its column j their column column_of[j]. None where the route does more than move whole rows and columns
        (element_sources), or the tensors differ in width."""
        widths = {shape[-1] for shape in shapes.values()}
        sources = self.element_sources(spec, shapes) if len(widths) == 1 else None
        if sources is None:
            return None
        index, width = sources[0].reshape(-1, spec.shape[-1]), widths.pop()
        rows, columns = index // width, index % width
        if bool((rows != rows[:, :1]).any()) or bool((columns != columns[:1, :]).any()):
            return None
        return rows[:, 0].long(), columns[0, :].long()

    def element_moves(self, spec: TensorSpec, shapes: Mapping[str, tuple[int, ...]],
                      ) -> Optional[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]]:
        """Where each element of the file's tensor `spec` is one element of the checkpoint tensors `shapes` times a
        factor (element_sources): a function taking other values shaped like those tensors (a gradient) to the
        file's layout, moved as the weights are and not scaled; None where the route does more. Unlike
        element_layout, the file's rows and columns need not be the checkpoint's: gpt-oss's fused expert
        gate_up_proj (experts x width x 2 ffn) becomes ffn_gate_exps and ffn_up_exps (experts x ffn x width) by a
        transpose and every other column."""
        sources = self.element_sources(spec, shapes)
        if sources is None:
            return None
        factor = sources[1]
        factors = None if bool((factor == 1).all()) else factor.float()
        del sources, factor

        def move(pieces: Mapping[str, torch.Tensor]) -> torch.Tensor:
            moved = self.file_layout(spec, pieces)
            return moved if factors is None else moved / factors.to(moved.device)

        return move

    def add_metadata(self, writer: gguf.GGUFWriter) -> None:
        writer.add_name(self.name)
        with config_errors():
            self.adapter.add_metadata(writer)
        self._add_tokenizer(writer)


@contextmanager
def config_errors() -> Iterator[None]:
    """Adapters read config.json freely; a missing key or a value of the wrong type or range in it becomes an
    InputError naming the key, instead of a traceback from deep inside an adapter."""
    try:
        yield
    except InputError:
        raise
    except KeyError as exc:
        raise InputError(f"config.json lacks '{exc.args[0]}'") from exc
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError, IndexError) as exc:
        raise InputError(f"config.json has a value of the wrong type or range ({exc})") from exc


def check_config(config: dict[str, Any]) -> None:
    """The hyper-parameters every adapter needs are there, and those adapters read have the right kind of value."""
    for key in REQUIRED_KEYS:
        if config.get(key) is None:
            raise InputError(f"config.json lacks '{key}'")
    for key in COUNT_KEYS:
        value = config.get(key)
        if value is not None and not (type(value) is int and 0 < value <= MAX_COUNT):
            raise InputError(f"config.json: '{key}' must be a positive integer, not {value!r}")
    for key in NUMBER_KEYS:
        value = config.get(key)
        if value is not None and not (type(value) in (int, float) and 0 < value < MAX_NUMBER):
            raise InputError(f"config.json: '{key}' must be a positive number, not {value!r}")
    for key in ("rope_parameters", "rope_scaling", "text_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise InputError(f"config.json: '{key}' must be an object, not {config[key]!r}")
    names = config.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise InputError(f"config.json: 'architectures' must be a list of names, not {names!r}")
    for key in ("num_hidden_layers", "n_layer"):
        if (config.get(key) or 0) > MAX_BLOCKS:
            raise InputError(f"config.json: '{key}' is {config[key]}; llama.cpp loads at most {MAX_BLOCKS} blocks")


def specs_from_records(adapter: Adapter, records: list[tuple[str, str, tuple[int, ...]]]) -> tuple[
        list[TensorSpec], dict[str, Callable[[], torch.Tensor]]]:
    """Specs for (hf name, dtype, shape) records, in llama.cpp's usual order: non-block tensors first, then blocks."""
    specs = []
    with config_errors():
        # name order, not file order: a model gives the same file however it is sharded or held (folder or memory)
        for hf_name, dtype, shape in sorted(records, key=lambda record: record[0]):
            name = adapter.gguf_name(hf_name)
            if name is None:
                continue
            if dtype not in FLOAT_DTYPES:
                raise InputError(f"tensor '{hf_name}' is stored as {dtype}; only float checkpoints can be converted")
            if not 1 <= len(shape) <= MAX_DIMS or 0 in shape:
                raise InputError(f"tensor '{hf_name}' has shape {list(shape)}; a GGUF tensor has 1 to {MAX_DIMS} "
                                 "non-empty dimensions")
            _check_transform(adapter, name, hf_name, tuple(shape))
            specs.append(TensorSpec(name, tuple(shape), hf_name, dtype))
        extra = {}
        for tensor in adapter.extra_tensors():
            specs.append(TensorSpec(tensor.name, tuple(tensor.shape), "computed", "F32"))
            extra[tensor.name] = tensor.make
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise InputError(f"two checkpoint tensors map to GGUF tensor '{spec.name}'")
        seen.add(spec.name)
    _check_embedding(adapter, specs)
    blocks = sorted({spec.block for spec in specs if spec.block is not None})
    if blocks != list(range(adapter.n_blocks)):
        raise InputError(f"config.json says {adapter.n_blocks} blocks (num_hidden_layers), the checkpoint has "
                         f"tensors for {len(blocks)} ({_ranges(blocks)})")
    specs.sort(key=lambda spec: (spec.block is not None, spec.block or 0))
    return specs, extra


def _check_embedding(adapter: Adapter, specs: list[TensorSpec]) -> None:
    """The token embedding is vocab_size x hidden_size, as the model class built from config.json makes it; a config
    that says otherwise describes another model (and a lying vocab_size would pad the vocabulary without end)."""
    embedding = next((spec for spec in specs if spec.name == TOKEN_EMBEDDING), None)
    if embedding is None:
        raise InputError(f"the checkpoint has no token embedding ({TOKEN_EMBEDDING})")
    rows, width = embedding.shape[0], embedding.shape[-1]
    for key, expected in (("vocab_size", rows), ("hidden_size", width)):
        value = adapter.config.get(key)
        if value is not None and value != expected:
            raise InputError(f"config.json: '{key}' is {value}, but the token embedding ({embedding.source}) has shape "
                             f"{list(embedding.shape)}")


def _check_transform(adapter: Adapter, name: str, hf_name: str, shape: tuple[int, ...]) -> None:
    """Run the adapter's value transform on a data-less tensor: a shape that does not fit config.json (head counts
    that do not divide the rows, say) is refused now, not after minutes of work."""
    try:
        transformed = adapter.transform(name, torch.empty(shape, device="meta"))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise InputError(f"tensor '{hf_name}' of shape {list(shape)} does not fit config.json ({exc})") from exc
    if tuple(transformed.shape) != shape:
        raise InputError(f"tensor '{hf_name}' of shape {list(shape)} does not fit config.json")


def _ranges(blocks: list[int]) -> str:
    if not blocks:
        return "none"
    return f"{blocks[0]}..{blocks[-1]}" if blocks == list(range(blocks[0], blocks[-1] + 1)) else str(blocks)


def open_checkpoint(model_dir: str | Path, *, allow_pickle: bool = False) -> SourceModel:
    """Open a Hugging Face checkpoint folder: reads config.json and safetensors headers only.

    allow_pickle: also read pytorch_model*.bin checkpoints (weights-only unpickling) when no safetensors exist.
    """
    from .tokenizer import add_tokenizer

    checkpoint = Checkpoint(model_dir, allow_pickle=allow_pickle)
    if not has_adapter(checkpoint.config):
        from .converter import open_converted

        return open_converted(checkpoint)
    check_config(checkpoint.config)
    with config_errors():
        adapter = adapter_for(checkpoint.config)
    records = [(record.name, record.dtype, record.shape) for record in checkpoint]
    specs, extra = specs_from_records(adapter, records)
    model_dir = Path(model_dir)

    def tokenizer(writer: gguf.GGUFWriter) -> None:
        add_tokenizer(writer, model_dir, checkpoint.config)

    return SourceModel(checkpoint.config, adapter, specs, lambda spec: checkpoint.load(spec.source), extra,
                       tokenizer, name=model_dir.resolve().name)
