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
        self.weights = self._map_weights(source)

    def _map_weights(self, source: SourceModel) -> list[Weight]:
        """Every 2-D parameter that is a weight of the GGUF file, in file order. A tied output head is the token
        embedding's parameter (transformers lists a shared parameter once, under its first name)."""
        found: dict[str, torch.nn.Parameter] = {}
        for hf_name, parameter in self.model.named_parameters():
            if parameter.dim() < 2:
                continue
            name = source.adapter.gguf_name(hf_name)
            spec = source.by_name.get(name) if name else None
            if spec is not None and spec.is_matrix and spec.numel == parameter.numel():
                found[name] = parameter
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
            weights.append(Weight(spec.name, found[spec.name], spec.block, start))
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
