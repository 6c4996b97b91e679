"""The whole model in memory, for noise-injection sensitivities (the reference method); and calibration tokens.

`ModelRunner` owns a transformers model (float32, on the GPU when there is one) and knows which of its parameters is
which GGUF weight. The default calibration streams blocks instead (stream.py) and never needs it. Two facts make the sensitivity measurements cheap: a weight of block b only changes what happens
from block b on, so the inputs of every block are cached once and a measurement runs the blocks b.. only
(`suffix_logits`); and the base model's log-probabilities are computed once.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..constants import OUTPUT_HEAD
from ..source.model import SourceModel
from .stream import replaced_forwards


@dataclass(frozen=True)
class Weight:
    """A GGUF weight and the transformers parameter that holds it."""

    name: str
    parameter: torch.nn.Parameter
    block: Optional[int]
    start: int                      # first block a change of this weight affects (n_blocks: only the head)
    # where the parameter holds more than this weight (fused experts: Mixtral's gate and up halves, gpt-oss's
    # interleaved gate and up columns) or holds it in another layout: for each element of the file's tensor, the
    # flat index of the parameter's element it is (None: the parameter is the weight, rows and columns as the file's)
    elements: Optional[torch.Tensor] = None

    def in_file_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor's elements of this weight, in the file's layout (its columns last)."""
        return tensor if self.elements is None else tensor.reshape(-1)[self.elements.to(tensor.device)]

    def mask(self) -> Optional[torch.Tensor]:
        """The parameter's elements that are this weight (None: all)."""
        if self.elements is None:
            return None
        mask = torch.zeros(self.parameter.numel(), dtype=torch.bool, device=self.parameter.device)
        mask[self.elements.reshape(-1).to(mask.device)] = True
        return mask.reshape(self.parameter.shape)


def calibration_tokens(tokenizer, text: str, n_tokens: int, ctx: int) -> torch.Tensor:
    """(chunks, ctx) token ids from the start of `text`, laid out as llama-imatrix (and llama-perplexity) lay them
    out: the text's tokens, after BOS where the tokenizer adds one, cut into chunks of ctx, then the first token of
    every chunk set to BOS. So each chunk after the first loses the text token at its start, and the importance
    vectors equal llama-imatrix's on the same text and context (tests/test_calibrate_moe.py). Inserting BOS before
    ctx - 1 text tokens instead, as this did before, shifted every later chunk by one more token than llama-imatrix's:
    on a tiny random Llama, vectors up to 34% apart. Fewer chunks than asked when the text is short."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    n_chunks = max(1, -(-n_tokens // ctx))
    needed = n_chunks * ctx - (1 if adds_bos else 0)
    # tokenise only as much text as needed: ~4 characters per token, with margin, growing if that was too little;
    # a few tokens beyond what is taken, so that the cut through a word never changes the tokens taken
    margin = 16
    take = max(4096, 8 * (needed + margin))
    while True:
        ids = tokenizer(text[:take], add_special_tokens=False).input_ids
        if len(ids) >= needed + margin or take >= len(text):
            break
        take *= 2
    stream = [bos] + ids if adds_bos else ids
    n_chunks = min(n_chunks, len(stream) // ctx)
    if n_chunks < 1:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
    chunks = torch.tensor(stream[:n_chunks * ctx], dtype=torch.long).reshape(n_chunks, ctx)
    if adds_bos:
        chunks[:, 0] = bos
    return chunks


class ModelRunner:
    def __init__(self, model_dir: str | Path, source: SourceModel, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # float32 everywhere: the noise measurements compare KL increases far below bf16 rounding
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **_placement(model_dir, device))
        self.model.eval()
        self.model.requires_grad_(False)
        self.decoder = self.model.get_decoder()
        self.layers = self.decoder.layers
        self.n_blocks = len(self.layers)
        self.input_device = self.model.get_input_embeddings().weight.device
        self.weights = self._map_weights(model_dir, source)

    def _map_weights(self, model_dir: str | Path, source: SourceModel) -> list[Weight]:
        """Every parameter of 2 or more dimensions that is, or holds, a weight of the GGUF file, in file order. A
        tied output head is the token embedding's parameter (transformers lists a shared parameter once, under its
        first name). The checkpoint tensors a parameter is made of come from transformers' conversion mapping
        (parameters.py), as in the streamed passes; where they are not simply the weight (stacked or fused experts),
        the weight's elements are found in the parameter (Weight.elements)."""
        from ..source.checkpoint import Checkpoint
        from .parameters import CheckpointParameters

        parameters = CheckpointParameters(self.model, Checkpoint(model_dir))
        found: dict[str, tuple[torch.nn.Parameter, Optional[torch.Tensor]]] = {}
        for hf_name, parameter in self.model.named_parameters():
            if parameter.dim() < 2:
                continue
            stored = parameters.checkpoint_names(hf_name) or [hf_name]
            names = {stored_name: [name for name in source.adapter.gguf_names(stored_name)
                                   if name in source.by_name and source.by_name[name].is_matrix]
                     for stored_name in stored}
            weights = list(dict.fromkeys(name for found_names in names.values() for name in found_names))
            for name in weights:
                spec = source.by_name[name]
                own = [stored_name for stored_name in stored if name in names[stored_name]]
                if len(stored) == 1 and len(weights) == 1 and spec.numel == parameter.numel():
                    found[name] = (parameter, None)
                    continue
                if set(spec.source.split("+")) != set(own):
                    continue     # a weight made of several parameters: not measured here
                found[name] = (parameter, _elements(parameters, source, spec, hf_name, parameter, own))
        weights = []
        for spec in source.specs:
            if spec.name not in found:
                continue
            if spec.block is not None:
                start = spec.block
            elif spec.name == OUTPUT_HEAD:
                start = self.n_blocks
            else:
                start = 0
            parameter, elements = found[spec.name]
            weights.append(Weight(spec.name, parameter, spec.block, start, elements))
        return weights

    # --- suffix forwards ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def block_inputs(self, ids: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Each block's output as its layer returned it (the next block's input), and the base log-probabilities."""
        outputs: list = [None] * self.n_blocks
        handles = [layer.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(
            index, output)) for index, layer in enumerate(self.layers)]
        try:
            logits = self.model(input_ids=ids.to(self.input_device), use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return outputs, F.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def suffix_logits(self, ids: torch.Tensor, start: int, block_outputs: list) -> torch.Tensor:
        """Logits of the model with blocks 0..start-1 replaced by their cached outputs: only blocks start.. and the
        head run (start = n_blocks runs the head alone)."""
        with self._skipping(start, block_outputs):
            return self.model(input_ids=ids.to(self.input_device), use_cache=False).logits

    def _skipping(self, start: int, block_outputs: list):
        """Layers before `start` return the cached output of layer start-1 instead of running."""
        if start == 0:
            return nullcontext()
        cached = block_outputs[start - 1]
        return replaced_forwards(self.layers[:start], lambda index: (lambda *args, **kwargs: cached))

def _elements(parameters, source: SourceModel, spec, hf_name: str, parameter: torch.Tensor,
              own: list[str]) -> Optional[torch.Tensor]:
    """For each element of the file's tensor `spec`, the flat index of the element of `parameter` it is made of:
    the parameter's elements numbered (in two float32-exact parts), cut into the checkpoint's tensors by
    transformers' conversion mapping, and moved as the reading route moves them. A route that computes rather than
    moves elements is refused."""
    low = 2048
    index = torch.arange(parameter.numel(), dtype=torch.int64).reshape(parameter.shape)

    def moved(values: torch.Tensor) -> torch.Tensor:
        pieces = parameters.split(hf_name, values.to(torch.float32))
        return source.file_layout(spec, {name: pieces[name] for name in own}).double()

    scale = moved(torch.ones(parameter.shape))
    parts = [moved(1 + index % low) / scale, moved(1 + index // low) / scale]
    if not all(bool(torch.isfinite(part).all()) and float((part - part.round()).abs().max()) < 0.25 for part in parts):
        raise InputError(f"noise injection cannot find {spec.name} in {hf_name}: the reading route computes it")
    elements = (parts[1].round().long() - 1) * low + parts[0].round().long() - 1
    if int(elements.min()) < 0 or int(elements.max()) >= parameter.numel():
        raise InputError(f"noise injection cannot find {spec.name} in {hf_name}")
    return elements


def kl_per_token(base_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || candidate) at every position, nats (float64 sum over the vocabulary)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return (base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1, dtype=torch.float64)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _placement(model_dir: str | Path, device: torch.device) -> dict:
    """Load straight onto the device. A model that the GPU cannot hold is refused rather than placed by
    device_map="auto": weights it offloads are meta tensors between forwards, which noise injection fails on."""
    if device.type != "cuda":
        return {"device_map": {"": str(device)}}
    free, _ = torch.cuda.mem_get_info(device)
    weights = sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))
    # stored bytes x (4 / stored width): float32 in memory; assume 16-bit storage, the usual case
    needed = 2 * weights
    if needed >= 0.8 * free:
        raise InputError(f"the model does not fit {device} for calibration: about {needed / 1e9:.1f} GB in float32, "
                         f"{free / 1e9:.1f} GB free; use --device cpu")
    return {"device_map": {"": str(device)}}
