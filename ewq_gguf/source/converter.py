"""READ through llama.cpp's own converter: every architecture the pinned convert_hf_to_gguf.py knows.

The llama.cpp tree that validates our files (ewq_gguf.llamacpp) carries `conversion/`, the registry of model
classes behind convert_hf_to_gguf.py: per architecture, set_gguf_parameters() and set_vocab() (the metadata) and
modify_tensors() (names, and values: permutations, splits of fused tensors, experts stacked into one 3-D tensor).
This route runs one of those classes the way the script does, but lazily (gguf-py's LazyTorchTensor: no tensor data
is read) and without writing: what it would write becomes our model, the tensor names and shapes, a recipe for each
tensor's values, and the metadata key-values. Our planners, quantizers and writer take it from there.

Two lazy passes, because the script decides two things in one call: with the F16 file type it says which tensors
llama.cpp keeps in F32 whatever the file type (routers, convolutions, norms); with F32 it gives the values unrounded.

A tensor's values are computed when asked for and not kept (gguf-py's own evaluation caches every intermediate in
the graph, which would hold the whole model by the end): a stacked expert tensor needs its block's experts of that
projection at once, nothing more.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import gguf
import torch

from .. import llamacpp
from ..errors import InputError, UnsupportedArchitectureError
from .checkpoint import Checkpoint
from .model import SourceModel, TensorSpec

# the output path the converter's classes ask for; nothing is written to it (dry_run, and write() is never called)
UNWRITTEN = Path(os.devnull)
# keys our writer sets itself, from the plan and the model folder
OWN_KEYS = ("general.architecture", "general.name", "general.file_type", "general.quantization_version")


@lru_cache(maxsize=1)
def conversion_package() -> Any:
    """llama.cpp's `conversion` package from the pinned tree (or EWQ_LLAMA_CPP), imported once."""
    tree = llamacpp.source_dir()
    if tree is None or not (tree / "conversion" / "__init__.py").is_file():
        raise InputError("this architecture converts through llama.cpp's converter, whose source is not here: run "
                         "`python -m ewq_gguf.llamacpp env --fetch` once (or set EWQ_LLAMA_CPP to a llama.cpp checkout)")
    installed = Path(gguf.__file__).parent / "constants.py"
    if installed.read_bytes() != (tree / "gguf-py" / "gguf" / "constants.py").read_bytes():
        raise InputError(f"llama.cpp's converter needs the gguf-py of its own tree, not the one installed: "
                         f"pip install --no-deps {tree / 'gguf-py'}")
    if str(tree) not in sys.path:
        sys.path.append(str(tree))
    import conversion  # noqa: E402  (found through the tree added above)
    # its per-tensor INFO lines would flood our progress output
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    return conversion


def supported_architectures() -> list[str]:
    """The Hugging Face architecture names llama.cpp's converter knows (text models)."""
    return sorted(conversion_package().TEXT_MODEL_MAP)


def converter_class(model_dir: Path) -> type:
    """The converter's model class for a checkpoint folder; UnsupportedArchitectureError names what is supported."""
    conversion = conversion_package()
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    try:
        architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    except ValueError as exc:
        raise UnsupportedArchitectureError(f"config.json names no architecture ({exc})") from exc
    try:
        return conversion.get_model_class(architecture)
    except NotImplementedError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture ({architecture}); supported: {', '.join(supported_architectures())}"
        ) from None


@dataclass(frozen=True)
class ConvertedTensor:
    """One tensor as the converter would write it."""

    name: str
    shape: tuple[int, ...]           # numpy order
    values: Any                      # gguf-py lazy tensor (float32) of the values
    sources: tuple[str, ...]         # the checkpoint tensors it is made from
    keeps_float: bool                # llama.cpp stores it in F32 in every file type


@dataclass
class Conversion:
    """What the converter would write for a folder: architecture, block count, metadata and tensors."""

    arch_name: str
    n_blocks: int
    metadata: dict[str, Any]         # key -> gguf-py GGUFValue, in the converter's order
    tensors: list[ConvertedTensor]
    leaves: dict[int, str]           # id of a lazy leaf in the tensors' graphs -> the checkpoint tensor it loads

    def gguf_names(self) -> dict[str, list[str]]:
        """checkpoint tensor name -> the GGUF tensors made from it, in file order (experts: the stacked tensor; a
        fused tensor the converter splits, as gpt-oss's gate_up_proj: each part)."""
        names: dict[str, list[str]] = {}
        for tensor in self.tensors:
            for source in tensor.sources:
                names.setdefault(source, []).append(tensor.name)
        return names


def run_converter(model_dir: Path) -> Conversion:
    """Run the converter's class for `model_dir` lazily, twice (see the module notes), and collect what it makes."""
    model_class = converter_class(model_dir)
    with converter_errors(model_class):
        stored_in_float = {name for name, qtype in _planned_types(model_class, model_dir).items()
                           if qtype == gguf.GGMLQuantizationType.F32}
        model = model_class(model_dir, gguf.LlamaFileType.ALL_F32, UNWRITTEN, eager=False, dry_run=True)
        sources = _tag_sources(model)
        model.prepare_tensors()
        model.prepare_metadata(vocab_only=False)
    writer = model.gguf_writer
    tensors = []
    for name, info in writer.tensors[0].items():
        tensors.append(ConvertedTensor(name, tuple(int(n) for n in info.tensor.shape), info.tensor,
                                       tuple(_sources_of(info.tensor, sources)), name in stored_in_float))
    metadata = {key: value for key, value in writer.kv_data[0].items() if key not in OWN_KEYS}
    return Conversion(gguf.MODEL_ARCH_NAMES[model.model_arch], int(model.block_count), metadata, tensors, sources)


@contextmanager
def converter_errors(model_class: type) -> Iterator[None]:
    """What the converter raises on a folder it cannot convert (a tensor it cannot name, a config key it lacks, a
    tokenizer it does not recognise) becomes one InputError line naming the architecture."""
    try:
        yield
    except (KeyError, ValueError, TypeError, AssertionError, NotImplementedError, FileNotFoundError) as exc:
        raise InputError(f"llama.cpp's converter cannot convert this folder as {model_class.__name__} "
                         f"({type(exc).__name__}: {exc})") from exc


def _planned_types(model_class: type, model_dir: Path) -> dict[str, gguf.GGMLQuantizationType]:
    """tensor name -> the type the converter gives it in an F16 file (F32 where llama.cpp keeps float)."""
    model = model_class(model_dir, gguf.LlamaFileType.MOSTLY_F16, UNWRITTEN, eager=False, dry_run=True)
    model.prepare_tensors()
    return {name: info.dtype for name, info in model.gguf_writer.tensors[0].items()}


def _tag_sources(model: Any) -> dict[int, str]:
    """Make every checkpoint tensor the converter loads remember its name; returns id(lazy leaf) -> name."""
    names: dict[int, str] = {}

    def tagged(name: str, make: Callable[[], Any]) -> Callable[[], Any]:
        def load() -> Any:
            leaf = make()
            names[id(leaf)] = name
            return leaf
        return load

    model.model_tensors = {name: tagged(name, make) for name, make in model.model_tensors.items()}
    return names


def _sources_of(lazy: Any, names: dict[int, str]) -> list[str]:
    """The tagged checkpoint tensors in a lazy tensor's graph, in the order the graph uses them."""
    found: list[str] = []
    stack = [lazy]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):
            stack.extend(reversed(node))
            continue
        if not isinstance(node, gguf.LazyBase) or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in names:
            found.append(names[id(node)])
        stack.extend(reversed(node._args))
    return found


def evaluate(lazy: Any, substitutes: Optional[dict[int, Any]] = None) -> torch.Tensor:
    """A lazy tensor's values as a torch tensor, computed without caching anything in the graph; the leaves whose
    ids are in `substitutes` take those values instead of loading theirs."""
    substitutes = substitutes or {}

    def value(node: Any) -> Any:
        if isinstance(node, (list, tuple)):
            return type(node)(value(item) for item in node)
        if not isinstance(node, gguf.LazyBase):
            return node
        if id(node) in substitutes:
            return substitutes[id(node)]
        if node._data is not None:
            return node._data
        return node._func(*value(node._args), **node._kwargs)

    result = value(lazy)
    return torch.from_numpy(result) if not isinstance(result, torch.Tensor) else result


def copy_metadata(metadata: dict[str, Any], writer: gguf.GGUFWriter) -> None:
    """Add the converter's key-values (architecture hyper-parameters, tokenizer) to our writer."""
    for key, entry in metadata.items():
        writer.add_key_value(key, entry.value, entry.type, sub_type=entry.sub_type)


class ConverterRoute:
    """The converter's answers in the shape SourceModel asks an architecture adapter for them."""

    def __init__(self, conversion: Conversion):
        self.conversion = conversion
        self.arch_name = conversion.arch_name
        self.n_blocks = conversion.n_blocks
        self._gguf_names = conversion.gguf_names()

    def gguf_name(self, hf_name: str) -> Optional[str]:
        names = self._gguf_names.get(hf_name)
        return names[-1] if names else None

    def gguf_names(self, hf_name: str) -> list[str]:
        return list(self._gguf_names.get(hf_name, ()))

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # the converter's modify_tensors already made the values llama.cpp's

    def add_metadata(self, writer: gguf.GGUFWriter) -> None:
        copy_metadata(self.conversion.metadata, writer)


def open_converted(checkpoint: Checkpoint) -> SourceModel:
    """A SourceModel of a checkpoint folder read through llama.cpp's converter."""
    conversion = run_converter(checkpoint.dir)
    specs = []
    for tensor in conversion.tensors:
        stored = [checkpoint.records[name].dtype for name in tensor.sources if name in checkpoint.records]
        # the narrowest float the sources hold: a BF16 checkpoint's tensors stay exact in BF16
        dtype = next((name for name in ("BF16", "F16") if name in stored), "F32")
        specs.append(TensorSpec(tensor.name, tensor.shape, "+".join(tensor.sources) or "computed", dtype,
                                keeps_float=tensor.keeps_float))
    values = {tensor.name: tensor.values for tensor in conversion.tensors}
    route = ConverterRoute(conversion)

    def relayout(spec: TensorSpec, pieces: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return evaluate(values[spec.name], {leaf: pieces[name] for leaf, name in conversion.leaves.items()
                                            if name in pieces})

    return SourceModel(checkpoint.config, route, specs, lambda spec: evaluate(values[spec.name]), {},
                       lambda writer: None, name=checkpoint.dir.resolve().name, relayout=relayout)
