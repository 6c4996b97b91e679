"""GPTQ rounding of a planned model: the inputs' second moments H = X^T X block by block, then quant/gptq.py.

One forward over the calibration tokens, block by block as the calibration's own passes run (stream.py): block i is
read from the checkpoint, hooks on its linear layers add X^T X of their inputs over every chunk (one matrix per
input: q/k/v, or gate/up, share theirs), the chunks' hidden states go through it, and its planned weights are rounded
with those matrices before the next block is read. Memory: one block, its H matrices and one chunk's hidden states;
the hidden states of all chunks and the rounded bytes live in a work folder (beside the output when converting), so
that the memory does not grow with the model, and an interrupted run continues from its last finished block when run
again with the same arguments (the calibration's WorkFolder). Every block sees the outputs of the unquantized blocks
before it, unless `sequential`.

Stacked expert tensors are rounded expert by expert, each with X^T X of the tokens routed to that expert (the
calibration's expert hooks, passes._ExpertInputs, find them); an expert no token reached keeps nearest rounding. An
untied output head is rounded last, with X^T X of the final norm's outputs (the last block's outputs through the
model's own final norm; the logits are not computed). Tensors without inputs here keep ggml's rounding, each with
its reason in the plan: the token embedding (a table, no product; a tied head is that table) and float types.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..constants import DEFAULT_GPTQ_TOKENS, OUTPUT_HEAD
from ..device import one_torch_thread
from ..errors import InputError
from ..plan import Plan
from ..quant import quantize
from ..quant.gptq import GPTQ_TYPES, gptq_quantize
from ..source.model import SourceModel
from .calibration import Calibration
from .runner import calibration_tokens
from .stream import StopForward, StreamedModel
from .workfolder import WorkFolder

# every token of a default calibration: on SmolLM2 at Q4_K_M size, 32768 tokens gave 0.60x nearest rounding's KLD
# where 8192 gave 0.76x (docs/results.md)

NOTE_NO_INPUTS = "no inputs collected (token embedding, tied output head)"
NOTE_NO_BETTER = "GPTQ no better on its objective"


@dataclasses.dataclass
class GptqOutcome:
    """The plan with each entry's rounding, the bytes of the tensors GPTQ rounded (or kept nearest after trying),
    and per tensor the objective tr((W-Q) H (W-Q)^T) of both roundings."""

    plan: Plan
    encoded: "RoundedTensors"
    objectives: dict[str, tuple[float, float]]   # name -> (gptq, nearest)
    # wall seconds of the pass: "inputs" (embedding the chunks), "forward" (the blocks over every chunk, H excluded),
    # "H" (adding X^T X), "rounding" (gptq_quantize, the nearest rounding it compares with included), "head"
    seconds: dict[str, float]


class RoundedTensors(Mapping):
    """The bytes of the rounded tensors, name -> (rows, row bytes) uint8, each read from its file in the work folder
    when asked for: a file writer takes them one at a time."""

    def __init__(self, folder: Path, names: list[str], keep_alive: object = None):
        self.folder = folder
        self.names = list(names)
        self._keep_alive = keep_alive   # a TemporaryDirectory that must outlive these reads

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return np.load(_tensor_path(self.folder, name))

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _tensor_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.npy"


def planned_rounding(plan: Plan) -> Plan:
    """The plan as --rounding gptq would round it, without measuring (dry runs): 'gptq' where it applies."""
    return Plan(plan.method, plan.params, [_marked(entry, "gptq" if _eligible(entry) else "nearest",
                                                   _ineligible_note(entry)) for entry in plan.entries], plan.blocks)


def reserved_rounding(plan: Plan) -> Plan:
    """The plan with the longest rounding records gptq_round can give it: every eligible tensor kept at nearest with
    its note, and the params' numbers at their longest. A --rounding gptq file's plan (in its header) is never
    larger, so a planner that sizes this plan's file keeps --target-size."""
    longest_float = -2.2250738585072014e-308
    params = dict(plan.params, rounding="gptq", gptq_tokens=2 ** 63 - 1, gptq_sequential=False,
                  gptq_objective={"ratio": longest_float, "median_ratio": longest_float})
    return Plan(plan.method, params, [_marked(entry, "nearest", NOTE_NO_BETTER if _eligible(entry) else
                                              _ineligible_note(entry)) for entry in plan.entries], plan.blocks)


def _eligible(entry) -> bool:
    """A matrix, or experts' matrices stacked, in a type with codes to choose."""
    return entry.type in GPTQ_TYPES and len(entry.shape) in (2, 3)


def _ineligible_note(entry) -> str:
    return NOTE_NO_INPUTS if _eligible(entry) else ""   # float types: nothing is rounded


def _marked(entry, rounding: str, note: str):
    return dataclasses.replace(entry, rounding=rounding, rounding_note=note)


def gptq_round(model_dir: str | Path, source: SourceModel, plan: Plan, calibration: Calibration, *,
               tokens: int = DEFAULT_GPTQ_TOKENS, device: torch.device = torch.device("cpu"),
               importance: Optional[dict[str, torch.Tensor]] = None, progress_bar: Callable = lambda items, **_: items,
               damp: float = 0.01, sequential: bool = False, work_dir: Optional[str | Path] = None) -> GptqOutcome:
    """Round every 2-D weight of `plan` that a decoder block's linear layer reads with GPTQ, on the first `tokens`
    tokens of the calibration's text (in chunks of its ctx). importance: the vectors the file is quantized with
    (--imatrix): the scale search's weights; without, diag(H). sequential: each block's inputs come from the blocks
    before it with their weights rounded (as the file computes), rather than from the unquantized model.
    work_dir: the work folder (kept for a rerun to resume until the caller removes it); None: a temporary one that
    lives as long as the outcome's tensors."""
    from ..text import load_text

    importance = importance or {}
    text = load_text(calibration.text)
    if text.sha256 != calibration.text_sha256:
        raise InputError(f"the calibration's text {calibration.text} changed since it was calibrated; GPTQ rounding "
                         "needs the same text")
    model = StreamedModel(model_dir, device, torch.float32)
    chunks = calibration_tokens(model.tokenizer, text.content, min(tokens, calibration.tokens), calibration.ctx)
    model.record_layer_arguments(chunks[:1])
    planned = {entry.name: entry for entry in plan.entries if _eligible(entry)}
    temporary = tempfile.TemporaryDirectory(prefix="ewq-gptq-") if work_dir is None else None
    key = {"model": str(Path(model_dir).resolve()), "text": text.sha256, "chunks": list(chunks.shape),
           "plan": {name: entry.type.name for name, entry in planned.items()}, "damp": damp, "sequential": sequential,
           "importance": _digest(importance)}
    work = WorkFolder(Path(temporary.name if temporary else work_dir), key)
    tensors = work.path / "tensors"
    tensors.mkdir(exist_ok=True)
    state = work.state
    seconds = state.setdefault("seconds", {"inputs": 0.0, "forward": 0.0, "H": 0.0, "rounding": 0.0, "head": 0.0})
    n_chunks = int(chunks.shape[0])
    shape = (1, int(chunks.shape[1]), int(model.embedding.weight.shape[-1]))
    files = {name: work.chunks(name, n_chunks, shape) for name in ("hidden-a", "hidden-b")}
    if "block" not in state:
        started = time.perf_counter()
        with torch.no_grad():
            for index in range(n_chunks):
                files["hidden-a"].write(index, model.embed(chunks[index:index + 1]))
        seconds["inputs"] += time.perf_counter() - started
        state.update(block=0, hidden="hidden-a", objectives={}, rounding={})
        work.save()
    objectives, rounding = state["objectives"], state["rounding"]

    def round_weight(name: str, hessian) -> None:
        """hessian: one matrix, or for stacked experts one per expert (None for an expert no token reached)."""
        started = time.perf_counter()
        entry = planned[name]
        weight = source.load(source.by_name[name]).to(device=device, dtype=torch.float32)
        experts = hessian if isinstance(hessian, list) else [hessian]
        matrices = weight.reshape(len(experts), -1, entry.shape[-1])
        vector = importance.get(name)
        vectors = None if vector is None else vector.reshape(-1, entry.shape[-1])
        parts, kept, nearest, rounded = [], 0.0, 0.0, False
        # GPTQ's column steps are small operations
        with one_torch_thread(device):
            for expert, (matrix, expert_hessian) in enumerate(zip(matrices, experts)):
                scale_weights = None if vectors is None else vectors[expert % vectors.shape[0]]
                if expert_hessian is None:
                    parts.append(quantize(matrix, entry.type, None if scale_weights is None else
                                          scale_weights.to(device)))
                    continue
                result = gptq_quantize(matrix, expert_hessian, entry.type, scale_weights, damp)
                parts.append(result.data)
                kept += min(result.objective_gptq, result.objective_nearest)
                nearest += result.objective_nearest
                rounded |= result.rounding == "gptq"
        path = _tensor_path(tensors, name)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as stream:
            np.save(stream, torch.cat(parts).cpu().numpy())
        os.replace(partial, path)
        # what the file holds (each expert's better rounding) against nearest rounding throughout
        objectives[name] = [kept, nearest]
        rounding[name] = ["gptq", ""] if rounded else ["nearest", NOTE_NO_BETTER]
        seconds["rounding"] += time.perf_counter() - started

    def run_blocks(layer: torch.nn.Module, block: int, source_file, target_file) -> None:
        started = time.perf_counter()
        for index in range(n_chunks):
            target_file.write(index, model.run_block(layer, block, source_file.read(index, device)))
        seconds["forward"] += time.perf_counter() - started

    for block in progress_bar(range(state["block"], model.n_blocks), desc="GPTQ blocks", unit="block"):
        target_name = "hidden-b" if state["hidden"] == "hidden-a" else "hidden-a"
        source_file, target_file = files[state["hidden"]], files[target_name]
        with model.block(block) as layer, torch.no_grad():
            hessians = _Hessians(model, source, layer, planned)
            with hessians.hooks():
                run_blocks(layer, block, source_file, target_file)
            seconds["forward"] -= hessians.seconds
            seconds["H"] += hessians.seconds
            for name, hessian in hessians.matrices().items():
                round_weight(name, hessian)
            # the next block's inputs: this block's outputs with its weights as the file will hold them
            if sequential and _load_rounded(layer, hessians, source, planned, RoundedTensors(tensors, rounding)):
                run_blocks(layer, block, source_file, target_file)
        del hessians
        state.update(block=block + 1, hidden=target_name)
        work.save()
    if not state.get("head"):
        started = time.perf_counter()
        head = _head_hessian(model, chunks, files[state["hidden"]], planned, device)
        seconds["head"] += time.perf_counter() - started
        if head is not None:
            round_weight(*head)
        state["head"] = True
        work.save()
    entries = []
    for entry in plan.entries:
        if entry.name in rounding:
            entries.append(_marked(entry, *rounding[entry.name]))
        else:
            entries.append(_marked(entry, "nearest", _ineligible_note(entry)))
    pairs = {name: (float(gptq), float(nearest)) for name, (gptq, nearest) in objectives.items()}
    params = dict(plan.params, rounding="gptq", gptq_tokens=int(chunks.numel()), gptq_sequential=sequential,
                  gptq_objective=objective_summary(pairs))
    return GptqOutcome(Plan(plan.method, params, entries, plan.blocks), RoundedTensors(tensors, rounding, temporary),
                       pairs, dict(seconds))


def _digest(importance: dict[str, torch.Tensor]) -> str:
    """A short digest of the importance vectors (part of a work folder's key)."""
    digest = hashlib.sha256()
    for name in sorted(importance):
        digest.update(name.encode())
        digest.update(importance[name].detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _head_hessian(model: StreamedModel, chunks: torch.Tensor, hidden, planned: dict,
                  device: torch.device) -> Optional[tuple[str, torch.Tensor]]:
    """X^T X of the output head's inputs (the last hidden states, read chunk by chunk from `hidden`, after the final
    norm), for an untied head that the plan rounds; None otherwise (a tied head is the token embedding, whose rows are
    also looked up)."""
    if model.tied or OUTPUT_HEAD not in planned:
        return None
    total: Optional[torch.Tensor] = None

    def take_input(module, args):
        nonlocal total
        flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        product = (flat.t() @ flat).double()
        total = product if total is None else total + product
        raise StopForward   # the logits themselves are not needed

    handle = model.head.register_forward_pre_hook(take_input)
    try:
        with torch.no_grad():
            for index in range(chunks.shape[0]):
                try:
                    model.logits(chunks[index:index + 1], hidden.read(index, device))
                except StopForward:
                    pass
    finally:
        handle.remove()
    return None if total is None else (OUTPUT_HEAD, total)


def _load_rounded(layer: torch.nn.Module, hessians: "_Hessians", source: SourceModel, planned: dict,
                  encoded: Mapping[str, np.ndarray]) -> bool:
    """Put the dequantized rounded weights into the block's linear layers, in the model's layout; True if any was.

    A GGUF weight is the module's weight with its rows permuted (llama's Q/K) or as it is; where the adapter does
    more (folded scales) or one GGUF weight fuses several modules, the layer keeps its float weight."""
    from ..quant import dequantize

    changed = False
    for module, names in hessians.targets:
        if len(names) != 1 or names[0] not in encoded:
            continue
        entry = planned[names[0]]
        rows, columns = module.weight.shape
        if (rows, columns) != tuple(entry.shape):
            continue
        order = _row_order(source, names[0], rows, columns)
        if order is None:
            continue
        values = dequantize(torch.from_numpy(encoded[names[0]]), entry.type, columns)
        restored = torch.empty_like(values)
        restored[order] = values            # GGUF row i is the module's row order[i]
        module.weight.data.copy_(restored.to(module.weight.device, module.weight.dtype))
        changed = True
    return changed


def _row_order(source: SourceModel, name: str, rows: int, columns: int) -> Optional[torch.Tensor]:
    """Which module row each GGUF row of `name` is, when the adapter only permutes rows (else None)."""
    probe = torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, columns).contiguous()
    try:
        moved = source.adapter.transform(name, probe)
    except Exception:  # an adapter that cannot take the probe: no sequential inputs through this weight
        return None
    if tuple(moved.shape) != (rows, columns) or not bool((moved == moved[:, :1]).all()):
        return None
    order = moved[:, 0].round().to(torch.int64)
    if not bool((moved[:, 0] == order).all()) or not torch.equal(order.sort().values, torch.arange(rows)):
        return None
    return order


def objective_summary(objectives: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The kept roundings' output error against nearest rounding's: summed over the tensors, and the median per
    tensor."""
    if not objectives:
        return {}
    ratios = sorted(min(gptq, nearest) / nearest if nearest > 0 else 1.0 for gptq, nearest in objectives.values())
    kept = sum(min(pair) for pair in objectives.values())
    nearest = sum(pair[1] for pair in objectives.values())
    return {"ratio": kept / nearest if nearest > 0 else 1.0, "median_ratio": ratios[len(ratios) // 2]}


class _Hessians:
    """X^T X of the inputs of a block's planned linear weights, summed in float64 over the chunks; for stacked expert
    weights one per expert, of the tokens routed to it."""

    def __init__(self, model: StreamedModel, source: SourceModel, layer: torch.nn.Module, planned: dict):
        self.sums: dict[int, torch.Tensor] = {}
        self.names: dict[str, int] = {}          # planned weight -> key of its inputs' sum
        self.targets: list[tuple[torch.nn.Module, list[str]]] = []
        self.experts: dict[int, tuple[torch.Tensor, list[str]]] = {}   # id(3-D parameter) -> it, its weights
        self.expert_sums: dict[str, list[Optional[torch.Tensor]]] = {}
        self.planned = planned
        self._last: Optional[tuple[torch.Tensor, int]] = None
        self.seconds = 0.0   # spent computing X^T X (_product)
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                names = [name for name in _gguf_names(model, source, model.hf_name(module) + ".weight")
                         if name in planned and planned[name].shape[-1] == module.in_features]
                if names:
                    self.targets.append((module, names))
        prefix = model.hf_name(layer)
        for local, parameter in layer.named_parameters():
            names = [name for name in _gguf_names(model, source, f"{prefix}.{local}")
                     if name in planned and len(planned[name].shape) == 3] if parameter.dim() == 3 else []
            if names:
                self.experts[id(parameter)] = (parameter, names)

    def hooks(self):
        from contextlib import ExitStack

        from .passes import _ExpertInputs

        stack = ExitStack()
        for module, names in self.targets:
            handle = module.register_forward_pre_hook(
                lambda module, args, kwargs, names=names: self._add(names, args[0] if args else kwargs["input"]),
                with_kwargs=True)
            stack.callback(handle.remove)
        if self.experts:
            stack.enter_context(_ExpertInputs(self.experts, self._add_expert))
        return stack

    def _product(self, inputs: torch.Tensor) -> torch.Tensor:
        """X^T X of the inputs (float64), its time added to self.seconds (the device waited for, so that the time
        is this work's)."""
        _wait(inputs.device)
        started = time.perf_counter()
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        product = (flat.t() @ flat).double()
        _wait(inputs.device)
        self.seconds += time.perf_counter() - started
        return product

    def _add(self, names: list[str], inputs: torch.Tensor) -> None:
        if self._last is not None and self._last[0] is inputs:   # the same input as the layer before (q, k, v)
            key = self._last[1]
        else:
            product = self._product(inputs)
            key = len(self.sums) if not any(name in self.names for name in names) else self.names[names[0]]
            self.sums[key] = self.sums[key] + product if key in self.sums else product
            self._last = (inputs, key)
        for name in names:
            self.names[name] = key

    def _add_expert(self, name: str, inputs: torch.Tensor, expert: int, n_experts: int) -> None:
        if inputs.shape[-1] != self.planned[name].shape[-1] or not inputs.numel():
            return   # a product with the slice that is not its weight's input (passes._ExpertInputs)
        sums = self.expert_sums.setdefault(name, [None] * n_experts)
        product = self._product(inputs)
        sums[expert] = product if sums[expert] is None else sums[expert] + product

    def matrices(self) -> dict[str, torch.Tensor | list[Optional[torch.Tensor]]]:
        return {**{name: self.sums[key] for name, key in self.names.items()}, **self.expert_sums}


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gguf_names(model: StreamedModel, source: SourceModel, parameter_name: str) -> list[str]:
    """The GGUF weights a parameter of the model feeds (BlockPasses.gguf_names)."""
    names = []
    for stored in model.parameters.checkpoint_names(parameter_name):
        name = source.adapter.gguf_name(stored)
        spec = source.by_name.get(name) if name else None
        if spec is not None and spec.is_matrix and name not in names:
            names.append(name)
    return names
