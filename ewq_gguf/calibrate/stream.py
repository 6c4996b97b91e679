"""A transformers model that never exists whole: its decoder blocks are read from the checkpoint one at a time.

The model is built from config.json by transformers itself, with every parameter on the meta device (no memory, no
initialisation) and every buffer real (the rotary tables transformers computes at construction and checkpoints do not
store). What lies outside the decoder blocks (token embedding, final norm, output head) is read once; a block is
read when a pass reaches it and dropped when the pass leaves it. So no architecture is re-implemented, and the
memory is that of the outer weights plus one block, whatever the depth.

Blocks are called directly, with the keyword arguments the decoder passes them (rotary tables, attention masks,
which differ between blocks where sliding and full attention alternate). Those are recorded once, by one run of the
decoder with every block replaced by a recorder: for chunks of one length they do not depend on the tokens. What
the decoder does before its first block (embedding, scaling) and after its last (final norm, head, soft-capping)
also runs through the model's own forward, with the blocks standing aside (`embed`, `head`).

Precision: the weights outside the blocks, the hidden states between blocks and the logits are float32. The blocks
compute in `compute_dtype`: float32, or bfloat16 for a checkpoint stored in bfloat16 where bfloat16 is fast (a GPU,
or a CPU with AVX512-BF16 or AMX, where it runs about 3x float32's rate); norms and softmax inside the blocks run in
float32 as transformers' own layers make them. A pass may ask for float32 blocks instead (`block`'s dtype): the
calibration runs the chunks it takes gradients on in float32 throughout.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..errors import InputError
from ..source.checkpoint import Checkpoint
from .parameters import CheckpointParameters


class StopForward(Exception):
    """Raised by the recorder in place of block 0, to end a forward once the block input is known."""


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (as accelerate's
    init_empty_weights(include_buffers=False), without the dependency). Initialisers then run on meta: no cost."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, parameter: Optional[torch.nn.Parameter]) -> None:
        register(module, name, parameter)
        if parameter is not None:
            module._parameters[name] = torch.nn.Parameter(parameter.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@contextmanager
def replaced_forwards(layers: Sequence[torch.nn.Module], make_forward: Callable[[int], Callable]) -> Iterator[None]:
    """Each layer's forward replaced by make_forward(its index) for as long as the context lasts. Instance
    attributes, so every attribute a decoder loop reads from a layer (attention types...) stays the layer's own; a
    forward already set on an instance is put back afterwards."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = make_forward(index)
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


class StreamedModel:
    """The transformers model of a checkpoint folder, materialised outside the blocks, block by block inside."""

    def __init__(self, model_dir: str | Path, device: torch.device, compute_dtype: Optional[torch.dtype] = None):
        """compute_dtype: the blocks' (None: bfloat16 for a bfloat16 checkpoint where that is fast, else float32)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.checkpoint = Checkpoint(model_dir)
        if compute_dtype is None:
            fast = stored_dtype(self.checkpoint) == "BF16" and fast_bfloat16(device)
            compute_dtype = torch.bfloat16 if fast else torch.float32
        self.compute_dtype = compute_dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with empty_parameters():
            # eager experts: a mixture-of-experts layer then runs each expert on its own tokens with its own slice
            # of the 3-D weights, which is what the importance hooks (passes.py) read
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager")
        self.model.eval()
        for module in self.model.modules():   # the real buffers to the device; parameters are read there later
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        self.parameters = CheckpointParameters(self.model, self.checkpoint)
        self.decoder = self.model.get_decoder()
        self.layers = self.decoder.layers
        self.n_blocks = len(self.layers)
        self.prefix = {id(module): name for name, module in self.model.named_modules()}
        self.embedding = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        # tied as transformers ties them when it loads the checkpoint (the head then reads the embedding's weight)
        self.tied = self.head is not None and bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
        # the blocks are read one at a time, the head only while the head's pass runs; the embedding's rows are
        # looked up exactly in their stored dtype, so it stays in it (half the memory of float32)
        skip = {id(parameter) for layer in self.layers for parameter in layer.parameters()}
        skip |= {id(self.embedding.weight), id(self.head.weight)}
        self._materialise(self.model, skip=skip)
        self._materialise(self.embedding, dtype=None)
        if self.tied:
            self.head.weight = self.embedding.weight
        self.layer_kwargs: dict[torch.dtype, list[tuple[tuple, dict[str, Any]]]] = {}
        self.returns_tuple: Optional[bool] = None

    # --- weights -------------------------------------------------------------------------------------------------
    def _materialise(self, module: torch.nn.Module, skip: frozenset | set = frozenset(),
                     requires_grad: bool = False, dtype: Optional[torch.dtype] = torch.float32) -> None:
        """Read the parameters of `module` (except `skip`) from the checkpoint, in `dtype` (None: as stored), on the
        device."""
        base = self.prefix[id(module)]
        done: set[int] = set()

        def read(stored: str) -> torch.Tensor:
            value = self.checkpoint.load(stored)
            if not value.is_floating_point():
                raise InputError(f"tensor '{stored}' is stored as {value.dtype}, not as floating point")
            return value.to(device=self.device, dtype=dtype)

        for name, parameter in list(module.named_parameters(remove_duplicate=False)):
            if id(parameter) in skip or id(parameter) in done:
                continue
            full_name = f"{base}.{name}" if base else name
            value = self.parameters.build(full_name, read)
            if tuple(value.shape) != tuple(parameter.shape):
                raise InputError(f"tensor '{full_name}' has shape {list(value.shape)} in the checkpoint, the "
                                 f"model's class expects {list(parameter.shape)}")
            self._set(module, name, torch.nn.Parameter(value, requires_grad=requires_grad))
            done.add(id(parameter))

    @staticmethod
    def _set(module: torch.nn.Module, name: str, parameter: torch.nn.Parameter) -> None:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        old = owner._parameters[leaf]
        owner._parameters[leaf] = parameter
        # a parameter shared under several names (a tied head) is replaced everywhere it appears
        for other in module.modules():
            for key, value in other._parameters.items():
                if value is old:
                    other._parameters[key] = parameter

    @contextmanager
    def block(self, index: int, requires_grad: bool = False,
              dtype: Optional[torch.dtype] = None) -> Iterator[torch.nn.Module]:
        """Block `index` with its weights read from the checkpoint in `dtype` (None: the compute dtype); dropped
        (back to meta) when the context ends."""
        layer = self.layers[index]
        self._materialise(layer, requires_grad=requires_grad, dtype=dtype or self.compute_dtype)
        try:
            yield layer
        finally:
            for name, parameter in list(layer.named_parameters()):
                self._set(layer, name, torch.nn.Parameter(torch.empty(parameter.shape, device="meta"),
                                                          requires_grad=False))

    @contextmanager
    def head_in_float32(self) -> Iterator[torch.nn.Module]:
        """The output head with its weight in float32, for the logits (a tied head is the embedding, made float32
        for as long and put back in its stored dtype afterwards)."""
        name = self.prefix[id(self.head)] + ".weight"
        if self.tied:
            stored = self.embedding.weight.dtype
            self._set(self.model, name, torch.nn.Parameter(self.embedding.weight.detach().float(), requires_grad=False))
        else:
            self._materialise(self.head)
        try:
            yield self.head
        finally:
            if self.tied:
                self._set(self.model, name, torch.nn.Parameter(self.head.weight.detach().to(stored),
                                                               requires_grad=False))
            else:
                self._set(self.model, name, torch.nn.Parameter(torch.empty(self.head.weight.shape, device="meta"),
                                                               requires_grad=False))

    def hf_name(self, module: torch.nn.Module) -> str:
        return self.prefix[id(module)]

    # --- passes through the model's own forward ------------------------------------------------------------------
    def record_layer_arguments(self, ids: torch.Tensor) -> None:
        """Record the arguments the decoder passes each block for chunks shaped like `ids` (1, ctx)."""
        recorded: list[tuple[tuple, dict[str, Any]]] = []

        def make_recorder(index: int) -> Callable:
            def recorder(*args, **kwargs):
                recorded.append((args[1:], kwargs))
                return args[0] if args else kwargs["hidden_states"]
            return recorder

        # float32 stand-ins for the embeddings: the rotary tables and masks are made in the embeddings' dtype
        stand_in = torch.zeros((*ids.shape, self.embedding.weight.shape[-1]), device=self.device)
        with torch.no_grad(), replaced_forwards(self.layers, make_recorder):
            self.decoder(inputs_embeds=stand_in, use_cache=False)
        if len(recorded) != self.n_blocks:
            raise InputError(f"the decoder called {len(recorded)} of its {self.n_blocks} blocks")
        for args, kwargs in recorded:
            kwargs.pop("hidden_states", None)
            kwargs["use_cache"] = False
        # in each dtype blocks run in, once, not at every call: rotary tables made in float32 would otherwise promote
        # the queries and keys of bfloat16 blocks back to float32
        self.layer_kwargs = {dtype: [(_cast_floats(args, dtype), _cast_floats(kwargs, dtype))
                                     for args, kwargs in recorded]
                             for dtype in {self.compute_dtype, torch.float32}}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Block 0's input for the chunk `ids` (1, ctx) in float32, as the decoder computes it (with autograd to
        the embedding when its weight requires gradients)."""
        caught: list[torch.Tensor] = []

        def make_catcher(index: int) -> Callable:
            def catcher(*args, **kwargs):
                caught.append(args[0] if args else kwargs["hidden_states"])
                raise StopForward
            return catcher

        with replaced_forwards(self.layers, make_catcher):
            try:
                self.decoder(input_ids=ids.to(self.device), use_cache=False)
            except StopForward:
                pass
        return caught[0].float()

    def run_block(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `index` on a float32 hidden state, in its weights' dtype; its output in float32 (differentiable)."""
        dtype = next(layer.parameters()).dtype
        args, kwargs = self.layer_kwargs[dtype][index]
        output = layer(hidden.to(dtype), *args, **kwargs)
        self.returns_tuple = isinstance(output, (tuple, list))
        return (output[0] if self.returns_tuple else output).float()

    def logits(self, ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for the chunk `ids` given the last block's output (final norm, head and whatever the
        model applies to logits run as in its own forward)."""
        returned = (last_hidden,) if self.returns_tuple else last_hidden
        with replaced_forwards(self.layers, lambda index: (lambda *args, **kwargs: returned)):
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside (tuples, lists, dicts of) a block's arguments in `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast_floats(item, dtype) for key, item in value.items()}
    return value


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are fast here: on CUDA, or on a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def stored_dtype(checkpoint: Checkpoint) -> str:
    """The dtype most of the checkpoint's values are stored in (F32, BF16, F16)."""
    totals: dict[str, int] = {}
    for record in checkpoint.records.values():
        totals[record.dtype] = totals.get(record.dtype, 0) + record.nbytes
    return max(totals, key=totals.get)
