"""The block-streaming passes of a calibration: activations forward, then gradients backward, one block at a time.

Forward, over every calibration chunk: block i is read from the checkpoint, each chunk's hidden state goes through
it, and what comes out is the input of block i+1. On the way, hooks measure the importance vectors (per input column
of every linear weight: the sum of x^2 and the token count, as llama-imatrix does) and LIM (-cos(block input, block
output) per token). The first `n_grad` chunks' block inputs are kept for the backward pass; these chunks run in
float32 blocks, forward and backward, whatever the compute dtype of the others: with bfloat16 blocks SmolLM2's Fisher
information came out up to 12x too large where its massive activations are read (early down projections), and its
token embedding's 4x too large on one chunk.

Backward, over those chunks (sensitivities, the linearity theorem's alpha: see plan/optimal.py): the KL divergence
to the model of a small change d of a weight W is 1/2 d^T F d, F the Fisher information of the model's own output
distribution. For noise-like error of relative size t^2 (||d||^2 = t^2 ||W||^2, spread evenly), its expectation is
t^2 ||W||^2 tr(F_W) / (2 N), N the weight's element count: alpha = ||W||^2 tr(F_W) / (2N), the slope that noise
injection measures. tr(F_W) is estimated without bias by the squared gradient of sum_s log p(y_s) with each y_s
drawn from the model's own prediction at position s: the positions' gradients have zero mean and independent draws,
so their cross terms vanish in expectation. Per chunk this is one backward pass, recomputing each block from its
kept input; the gradient reaching a block's input is what the block below backpropagates. Each chunk gives its own
estimate, so their spread is the uncertainty (sensitivity.py bootstraps over them).

Where an error falls matters as much as its size: alpha prices an error spread evenly over the elements, and a
quantization error is not (it follows the scale of each block of each row). The KL of an error d is
1/2 sum_ij F_ij d_ij^2 over the diagonal of the Fisher information; the passes keep each weight's row sums R_i and
column sums C_j of it (squared gradients), and take F_ij as R_i C_j / T, T = sum F: the one matrix of rank one with
the same row and column sums. On SmolLM2 its prediction of a quantization error's KL is within 3% of the full
diagonal's for 90% of the (weight, type) pairs, where weighting only the input columns by their activations was off
by 2x to 13x for one pair in twenty. So the weighted errors t2_w = sum_ij R_i C_j d_ij^2 / sum_ij R_i C_j W_ij^2
(quant_error.py) with alpha_weighted = sum_ij R_i C_j W_ij^2 / (2 T) per token predict the KL of any error of a
weight. A linear layer's rows are its outputs and its columns its inputs; a vocabulary matrix's row is a token, whose
mass is how often it is read or predicted. The sums are taken on the checkpoint's tensors and moved to the file's
rows and columns as the reading route moves their elements (SourceModel.element_layout): stacked experts are rows
like any other. Where the route moves single elements rather than whole rows and columns (gpt-oss's fused expert
gate_up_proj, transposed and split into ffn_gate_exps and ffn_up_exps), each chunk's gradient is moved into the
file's layout (SourceModel.element_moves) and summed there.

The output head's gradient is never formed (vocabulary x width). Its Fisher is taken in expectation over the drawn
labels instead: element (r, j)'s is sum_s p_sr (1 - p_sr) h_sj^2 (times the squared derivative of any soft-cap);
a single draw would make exactly the rows of the drawn tokens look heavy. A tied embedding is one weight reached
twice; the gradient is the sum of both paths, and the embedding path only touches the rows of the chunk's tokens,
on which it adds to the head's expected square what it adds to the sampled one: (e + h)^2 - h^2.
"""
from __future__ import annotations

import zlib
from contextlib import ExitStack
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .imatrix import ImportanceMatrix
from ..constants import OUTPUT_HEAD, TOKEN_EMBEDDING
from ..source.model import SourceModel
from .stream import StreamedModel, StopForward
from .workfolder import WorkFolder

# rows squared at a time in float32 (bounds the temporary copy of a large weight or gradient)
CHUNK_ROWS = 4096
# the blocks' dtype for the chunks gradients are taken on, forward and backward (module docstring)
GRADIENT_DTYPE = torch.float32


class BlockPasses:
    """Runs the passes of one calibration; every result accumulates in `work.state` and survives a restart."""

    def __init__(self, model: StreamedModel, source: SourceModel, chunks: torch.Tensor, n_grad: int,
                 work: WorkFolder, imatrix: ImportanceMatrix, progress_bar: Callable, seed: int = 0):
        self.model = model
        self.source = source
        self.chunks = chunks
        self.n_grad = n_grad
        self.work = work
        self.imatrix = imatrix
        self.progress_bar = progress_bar
        self.seed = seed
        self.device = model.device
        width = model.embedding.weight.shape[-1]
        self.chunk_shape = (1, int(chunks.shape[1]), int(width))
        state = work.state
        state.setdefault("forward", 0)          # blocks the forward pass has finished
        state.setdefault("hidden", "hidden-a")  # the file holding the next block's input
        state.setdefault("lim", [[0.0, 0.0] for _ in range(model.n_blocks)])
        state.setdefault("head", False)
        state.setdefault("backward", 0)         # blocks the backward pass has finished, from the last one down
        state.setdefault("gradient", "gradient-a")
        state.setdefault("embedding", False)
        state.setdefault("traces", {})          # GGUF weight -> per-chunk ||gradient||^2
        state.setdefault("norms", {})           # GGUF weight -> [||W||^2, sum_ij r_i c_j W_ij^2, N] (_note_norms)
        saved = work.load_arrays("imatrix")
        for key, value in saved.items():
            kind, _, name = key.partition(":")
            (imatrix.sums if kind == "sums" else imatrix.counts)[name] = value
        # GGUF weight -> its Fisher's row sums R (in the file's row order) and column sums C, over the chunks
        self.fisher_rows: dict[str, np.ndarray] = work.load_arrays("rows")
        self.fisher_columns: dict[str, np.ndarray] = work.load_arrays("columns")
        # (role, shapes, shared) -> the kind of route found for it, and its layout (_route)
        self._route_kinds: dict[tuple, tuple[str, Optional[tuple[torch.Tensor, torch.Tensor]]]] = {}

    # --- names ---------------------------------------------------------------------------------------------------
    def gguf_weights(self, stored: str) -> list[str]:
        """The planned GGUF weights made from checkpoint tensor `stored`: none (one kept in float, or unused), one,
        or several where the route splits a fused tensor (gpt-oss's gate_up_proj: ffn_gate_exps and ffn_up_exps)."""
        names = self.source.adapter.gguf_names(stored)
        return [name for name in names if name in self.source.by_name and self.source.by_name[name].is_matrix]

    def gguf_names(self, parameter_name: str) -> list[str]:
        """The planned GGUF weights a parameter of the model feeds: one, or two for experts' fused gate and up."""
        names = (name for stored in self.model.parameters.checkpoint_names(parameter_name)
                 for name in self.gguf_weights(stored))
        return list(dict.fromkeys(names))

    def _save(self) -> None:
        arrays = {f"sums:{name}": value for name, value in self.imatrix.sums.items()}
        arrays.update({f"counts:{name}": value for name, value in self.imatrix.counts.items()})
        self.work.save_arrays("imatrix", arrays)
        self.work.save_arrays("rows", self.fisher_rows)
        self.work.save_arrays("columns", self.fisher_columns)
        self.work.save()

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self) -> None:
        state, n_chunks, n_blocks = self.work.state, int(self.chunks.shape[0]), self.model.n_blocks
        files = {name: self.work.chunks(name, n_chunks, self.chunk_shape) for name in ("hidden-a", "hidden-b")}
        if state["forward"] == 0 and not state.get("embedded"):
            with torch.no_grad():
                for index in range(n_chunks):
                    files["hidden-a"].write(index, self.model.embed(self.chunks[index:index + 1]))
            state["embedded"] = True
            self.work.save()
        for block in self.progress_bar(range(state["forward"], n_blocks), desc="blocks forward", unit="block"):
            source = files[state["hidden"]]
            target_name = "hidden-b" if state["hidden"] == "hidden-a" else "hidden-a"
            target = files[target_name]
            inputs = self.work.chunks(f"inputs-{block}", self.n_grad, self.chunk_shape) if self.n_grad else None
            cos = state["lim"][block] = [0.0, 0.0]
            for dtype, indices in self._forward_groups(n_chunks):
                with self.model.block(block, dtype=dtype) as layer, self._imatrix_hooks(layer), torch.no_grad():
                    for index in indices:
                        hidden = source.read(index, self.device)
                        if index < self.n_grad:
                            inputs.write(index, hidden)
                        output = self.model.run_block(layer, block, hidden)
                        cosine = F.cosine_similarity(hidden, output, dim=-1)
                        cos[0] += float(cosine.double().sum())
                        cos[1] += cosine.numel()
                        target.write(index, output)
            state["forward"] = block + 1
            state["hidden"] = target_name
            self._save()

    def _forward_groups(self, n_chunks: int) -> list[tuple[torch.dtype, range]]:
        """(block dtype, chunk indices) of a forward step: the gradient chunks in float32, the others in the
        compute dtype (one group when that is float32)."""
        if self.model.compute_dtype == GRADIENT_DTYPE:
            return [(GRADIENT_DTYPE, range(n_chunks))]
        groups = [(GRADIENT_DTYPE, range(self.n_grad)), (self.model.compute_dtype, range(self.n_grad, n_chunks))]
        return [(dtype, indices) for dtype, indices in groups if indices]

    def _imatrix_hooks(self, layer: torch.nn.Module) -> ExitStack:
        """Importance hooks on the block's linear layers, and on the slices of its 3-D expert weights."""
        handles, experts = [], {}
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                for name in self.gguf_names(self.model.hf_name(module) + ".weight"):
                    handles.append(module.register_forward_pre_hook(
                        lambda module, args, kwargs, name=name: self._add_input(name, args[0] if args else
                                                                                kwargs["input"]), with_kwargs=True))
        prefix = self.model.hf_name(layer)
        for local, parameter in layer.named_parameters():
            names = self.gguf_names(f"{prefix}.{local}") if parameter.dim() == 3 else []
            if names:
                experts[id(parameter)] = (parameter, names)
        stack = ExitStack()
        stack.enter_context(_Handles(handles))
        if experts:
            stack.enter_context(_ExpertInputs(experts, self._add_input))
        return stack

    def _add_input(self, name: str, inputs: torch.Tensor, expert: int = 0, n_experts: int = 1) -> None:
        if n_experts > 1 and inputs.shape[-1] != self.source.by_name[name].shape[-1]:
            return   # a product with an expert's slice that is not its weight's input (the check after the pass says so)
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.imatrix.add(name, flat.pow(2).sum(0).double().cpu().numpy(), flat.shape[0], expert, n_experts)

    def lim(self) -> list[float]:
        return [-total / count if count else 0.0 for total, count in self.work.state["lim"]]

    # --- output head ---------------------------------------------------------------------------------------------
    def head(self) -> None:
        """The head's importance vector over every chunk; for the first n_grad chunks also the sampled-label
        gradient of the last hidden state, and the head weight's gradient norms."""
        state = self.work.state
        if state["head"]:
            return
        n_chunks = int(self.chunks.shape[0])
        hidden = self.work.chunks(state["hidden"], n_chunks, self.chunk_shape)
        gradients = self.work.chunks(state["gradient"], max(self.n_grad, 1), self.chunk_shape)
        head_name = OUTPUT_HEAD if not self.model.tied else TOKEN_EMBEDDING
        if head_name not in self.source.by_name:
            head_name = None
        captured: dict[str, torch.Tensor] = {}

        def take_input(module, args):
            captured["input"] = args[0]
            if "stop" in captured:
                raise StopForward

        def keep_output(module, args, output):
            captured["output"] = output

        traces = state["traces"].setdefault(head_name, []) if head_name else None
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with self.model.head_in_float32() as head, _Handles([head.register_forward_pre_hook(take_input),
                                                             head.register_forward_hook(keep_output)]):
            for index in self.progress_bar(range(n_chunks), desc="head", unit="chunk"):
                ids = self.chunks[index:index + 1]
                last = hidden.read(index, self.device)
                if index >= self.n_grad:
                    captured["stop"] = True
                    with torch.no_grad():
                        try:
                            self.model.logits(ids, last)
                        except StopForward:
                            pass
                    if head_name:
                        self._add_input(head_name, captured["input"])
                    continue
                captured.pop("stop", None)
                last.requires_grad_(True)
                logits = self.model.logits(ids, last)
                if head_name:
                    self._add_input(head_name, captured["input"])
                log_probs = F.log_softmax(logits.float(), dim=-1)
                drawn = sampled_labels(log_probs.detach(), self.seed, index)
                sampled_loss = -log_probs.gather(-1, drawn.unsqueeze(-1)).sum()
                if head_name:
                    head_output = captured["output"]
                    # d logits / d head output, elementwise: 1 where the logits are the head's output, else a
                    # soft-cap's or scale's derivative
                    slope = None if logits is head_output else \
                        torch.autograd.grad(logits.sum(), head_output, retain_graph=True)[0]
                    # both gradients returned, none accumulated in .grad: a .grad retained on the head's output
                    # would also collect the slope above, adding sum_s h_s to every row's sampled head gradient
                    last_gradient, head_gradient = torch.autograd.grad(sampled_loss, (last, head_output))
                else:
                    last_gradient, = torch.autograd.grad(sampled_loss, last)
                gradients.write(index, last_gradient)
                if head_name:
                    features = captured["input"].detach().reshape(-1, captured["input"].shape[-1]).float()
                    deltas = head_gradient.reshape(-1, head_output.shape[-1]).float()
                    # the head's own rows in expectation over the labels, not from the one draw: a row's estimate
                    # from a draw is large exactly where its token happened to be drawn
                    probabilities = log_probs.detach().exp().reshape(deltas.shape)
                    expected = probabilities * (1 - probabilities)
                    if slope is not None:
                        expected *= slope.reshape(deltas.shape).float().pow(2)
                    squares = features.pow(2)
                    row_fisher = (expected * squares.sum(1, keepdim=True)).sum(0).double()
                    column_fisher = (expected.sum(1, keepdim=True) * squares).sum(0).double()
                    traces.append(float(row_fisher.sum()))
                    self._add_fisher(head_name, slice(None), row_fisher, column_fisher)
                    if self.model.tied:
                        # the head's sampled gradient on the rows of this chunk's tokens: the embedding's path
                        # adds to it (the cross term of the two paths), later
                        token_rows = torch.unique(ids.to(self.device))
                        rows[index] = (token_rows, deltas[:, token_rows].T @ features)
                captured.clear()
            if head_name and self.n_grad and not self.model.tied:   # a tied one's: after the embedding's pass
                self._note_norms(head_name, head.weight)
        if rows:
            torch.save({index: (token_rows.cpu(), values.cpu()) for index, (token_rows, values) in rows.items()},
                       self.work.path / "head-rows.pt")
        state["head"] = True
        self._save()

    # --- backward ------------------------------------------------------------------------------------------------
    def backward(self) -> None:
        state, n_blocks = self.work.state, self.model.n_blocks
        shape = (max(self.n_grad, 1), self.chunk_shape)
        files = {name: self.work.chunks(name, *shape) for name in ("gradient-a", "gradient-b")}
        for done in self.progress_bar(range(state["backward"], n_blocks), desc="blocks backward", unit="block"):
            block = n_blocks - 1 - done
            source = files[state["gradient"]]
            target_name = "gradient-b" if state["gradient"] == "gradient-a" else "gradient-a"
            target = files[target_name]
            inputs = self.work.chunks(f"inputs-{block}", self.n_grad, self.chunk_shape)
            with self.model.block(block, requires_grad=True, dtype=GRADIENT_DTYPE) as layer:
                prefix = self.model.hf_name(layer)
                weights = [(f"{prefix}.{local}", parameter) for local, parameter in layer.named_parameters()
                           if self.gguf_names(f"{prefix}.{local}")]
                traces: dict[str, list[float]] = {}
                # per GGUF weight: how its checkpoint tensors' elements reach the file (_Route), and the row and
                # column sums of its squared gradient, per checkpoint tensor or (route.move) in the file's layout
                routes: dict[str, _Route] = {}
                marginals: dict[str, dict[str, list[torch.Tensor]]] = {}
                for index in range(self.n_grad):
                    hidden = inputs.read(index, self.device).requires_grad_(True)
                    output = self.model.run_block(layer, block, hidden)
                    output.backward(source.read(index, self.device))
                    for gguf_name, pieces in self._weight_pieces(weights, gradients=True).items():
                        if gguf_name not in routes:
                            routes[gguf_name] = self._route(gguf_name, pieces)
                        move = routes[gguf_name].move
                        sums = ({FILE_LAYOUT: _square_marginals(move(pieces))} if move is not None else
                                {stored: _square_marginals(gradient) for stored, gradient in pieces.items()})
                        accumulated = marginals.setdefault(gguf_name, {})
                        for key, (row_squares, column_squares) in sums.items():
                            if key in accumulated:
                                accumulated[key][0] += row_squares
                                accumulated[key][1] += column_squares
                            else:
                                accumulated[key] = [row_squares, column_squares]
                        square = sum(float(row_squares.sum()) for row_squares, _ in sums.values())
                        traces.setdefault(gguf_name, []).append(square)
                    for parameter in layer.parameters():
                        parameter.grad = None
                    target.write(index, hidden.grad)
                for gguf_name, pieces in self._weight_pieces(weights, gradients=False).items():
                    self._add_block_weight(gguf_name, pieces, marginals[gguf_name], routes[gguf_name])
            state["traces"].update(traces)
            state["backward"] = done + 1
            state["gradient"] = target_name
            self._save()
            self.work.drop(f"inputs-{block}")

    def embedding(self) -> None:
        state = self.work.state
        if state["embedding"] or TOKEN_EMBEDDING not in self.source.by_name:
            return
        gradients = self.work.chunks(state["gradient"], max(self.n_grad, 1), self.chunk_shape)
        embedding = self.model.embedding
        head_rows = torch.load(self.work.path / "head-rows.pt") if self.model.tied else {}
        embedding.weight.requires_grad_(True)
        sparse = embedding.sparse
        embedding.sparse = True          # the gradient touches only the rows of the chunk's tokens
        traces = []
        try:
            for index in range(self.n_grad):
                hidden = self.model.embed(self.chunks[index:index + 1])
                hidden.backward(gradients.read(index, self.device))
                gradient = embedding.weight.grad.coalesce()
                embedding.weight.grad = None
                token_rows, values = gradient.indices()[0], gradient.values().double()
                head_alone = torch.zeros_like(values)
                if index in head_rows:
                    # the head's gradient on these rows is added; on the other rows it is in the head's traces
                    head_tokens, head_values = head_rows[index]
                    position = {int(token): row for row, token in enumerate(token_rows.tolist())}
                    picked = torch.tensor([position[int(token)] for token in head_tokens], device=values.device)
                    head_alone.index_add_(0, picked, head_values.to(values.device).double())
                added = (values + head_alone).pow(2) - head_alone.pow(2)      # both paths, less the head's alone
                self._add_fisher(TOKEN_EMBEDDING, token_rows, added.sum(1), added.sum(0))
                before = state["traces"][TOKEN_EMBEDDING][index] if self.model.tied else 0.0
                traces.append(before + float(added.sum()))
        finally:
            embedding.sparse = sparse
            embedding.weight.requires_grad_(False)
            embedding.weight.grad = None
        state["traces"][TOKEN_EMBEDDING] = traces
        self._note_norms(TOKEN_EMBEDDING, embedding.weight)
        state["embedding"] = True
        self._save()

    def _pieces(self, name: str, tensor: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensor -> its part of `tensor`, shaped like parameter `name` (a missing gradient: zeros)."""
        if tensor is None:
            parameter = self.model.model.get_parameter(name)
            tensor = torch.zeros(parameter.shape, dtype=parameter.dtype, device=parameter.device)
        return self.model.parameters.split(name, tensor)

    def _weight_pieces(self, weights: list[tuple[str, torch.Tensor]], gradients: bool,
                       ) -> dict[str, dict[str, torch.Tensor]]:
        """GGUF weight -> {checkpoint tensor: its values (or gradient)}: each parameter (gradient) cut into the
        checkpoint's tensors (fused experts: per expert and projection), each going to the GGUF weights made of it
        (a fused tensor the route splits: to each of its parts), in the checkpoint tensors' order."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for name, parameter in weights:
            tensor = parameter.grad if gradients else parameter.detach()
            for stored, piece in self._pieces(name, tensor).items():
                for gguf_name in self.gguf_weights(stored):
                    found.setdefault(gguf_name, {})[stored] = piece
        return found

    def _route(self, name: str, pieces: dict[str, torch.Tensor]) -> "_Route":
        """How the reading route makes GGUF weight `name` of the checkpoint tensors `pieces` (module docstring)."""
        spec = self.source.by_name[name]
        shapes = {stored: tuple(piece.shape) for stored, piece in pieces.items()}
        # whole rows and columns (cheap: marginals moved once, at the end) unless a tensor feeds several weights
        shared = any(len(self.gguf_weights(stored)) > 1 for stored in pieces)
        # found once per role and shapes: the probe pushes whole tensors through the route (a quarter of a second
        # for a 0.5B model's weight), and the route treats every block's tensors of one role and shape alike
        key = (spec.role, spec.shape, tuple(shapes.values()), shared)
        if key not in self._route_kinds:
            layout = None if shared else self.source.element_layout(spec, shapes)
            move = self.source.element_moves(spec, shapes) if layout is None else None
            self._route_kinds[key] = ("layout", layout) if layout is not None else ("move" if move else "none", None)
            return _Route(layout, move)
        kind, layout = self._route_kinds[key]
        # a move reads the pieces by this block's checkpoint names: made for this weight (gpt-oss's experts only)
        return _Route(layout, self.source.element_moves(spec, shapes) if kind == "move" else None)

    def _add_fisher(self, name: str, rows, row_values: torch.Tensor, column_values: torch.Tensor) -> None:
        """Accumulate (float64) a weight's Fisher mass on its rows `rows` (indices, or a slice for all of them, in
        the file's row order) and on its columns."""
        if name not in self.fisher_rows:
            spec = self.source.by_name[name]
            self.fisher_rows[name] = np.zeros(spec.numel // spec.shape[-1])
            self.fisher_columns[name] = np.zeros(spec.shape[-1])
        row_values = row_values.double().cpu().numpy()
        if isinstance(rows, slice):
            self.fisher_rows[name][rows] += row_values
        else:
            np.add.at(self.fisher_rows[name], rows.cpu().numpy(), row_values)
        self.fisher_columns[name] += column_values.double().cpu().numpy()

    def _add_block_weight(self, name: str, values: dict[str, torch.Tensor],
                          marginals: dict[str, list[torch.Tensor]], route: "_Route") -> None:
        """A block weight's Fisher row and column sums, moved from its checkpoint tensors' rows and columns to the
        file's as the reading route moves them (q and k rows are permuted for llama.cpp, experts stacked), or taken
        in the file's layout where the route moves single elements (route.move: a transpose, an interleaved split),
        then its norms. Where the route does more than move elements, the weight keeps even error weights."""
        spec = self.source.by_name[name]
        n_rows, n_columns = spec.numel // spec.shape[-1], spec.shape[-1]
        if route.move is not None:
            rows, columns = marginals[FILE_LAYOUT]
            norm2 = float(_square_marginals(route.move(values))[0].sum())
        else:
            rows = torch.cat([marginals[stored][0] for stored in values])
            columns = sum(marginals[stored][1] for stored in values)
            if route.layout is not None:
                row_of, column_of = route.layout
                rows, columns = rows[row_of.to(rows.device)], columns[column_of.to(columns.device)]
            else:
                rows, columns = rows.sum().expand(n_rows) / n_rows, columns.sum().expand(n_columns) / n_columns
            norm2 = sum(float(_square_marginals(value)[0].sum()) for value in values.values())
        self._add_fisher(name, slice(None), rows, columns)
        self._note_norms(name, self.source.file_layout(spec, values), norm2)

    def _note_norms(self, name: str, weight: torch.Tensor, norm2: Optional[float] = None) -> None:
        """Once a weight's Fisher marginals are complete: ||W||^2 and sum_ij r_i c_j W_ij^2 (r, c: its Fisher row
        and column sums, each normalised to sum 1; even where it has none), which turn the per-chunk traces into
        alphas (chunk_alphas). weight: as the file holds it; norm2: ||W||^2 of the model's own weight, where the
        route scales it (alpha is the model's; the share r c weighs does not change with a scale)."""
        rows = weight.detach().reshape(-1, weight.shape[-1])
        row_shares = _shares(self.fisher_rows.get(name), rows.shape[0]).to(rows.device)
        column_shares = _shares(self.fisher_columns.get(name), rows.shape[1]).to(rows.device)
        file_norm2, weighted = 0.0, 0.0
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            squares = rows[start:start + CHUNK_ROWS].double().pow(2)
            file_norm2 += float(squares.sum())
            weighted += float(row_shares[start:start + CHUNK_ROWS] @ squares @ column_shares)
        if norm2 is None:
            norm2 = file_norm2
        elif file_norm2 > 0:
            weighted *= norm2 / file_norm2
        self.work.state["norms"][name] = [norm2, weighted, int(weight.numel())]


def _shares(sums: Optional[np.ndarray], size: int) -> torch.Tensor:
    """Fisher sums normalised to sum 1 (float64); even shares where there are none."""
    if sums is None or not sums.sum() > 0:
        return torch.full((size,), 1.0 / size, dtype=torch.float64)
    return torch.from_numpy(sums / sums.sum())


def _square_marginals(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and per column, the sum of x^2 (float64), squared in float32 a slice of rows at a time (a float32
    copy of a whole bfloat16 gradient would double its memory)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    row_sums, column_sums = [], torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for part in rows.split(CHUNK_ROWS):
        squares = part.float().pow(2)
        row_sums.append(squares.sum(1).double())
        column_sums += squares.sum(0).double()
    return torch.cat(row_sums), column_sums


def sampled_labels(log_probs: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """One label per position of chunk `index` from the model's own prediction (log_probs: (..., vocabulary)), drawn
    on the CPU by a generator seeded by the seed and the chunk, so that every device draws the same labels from the
    same probabilities: by inverting each position's cumulative distribution (float64) at a uniform number, a tenth
    of torch.multinomial's time (2 s for 512 positions of a 152k vocabulary on two cores)."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}".encode()))
    probabilities = log_probs.reshape(-1, log_probs.shape[-1]).double().exp().cpu()
    cumulative = probabilities.cumsum_(-1)
    uniform = torch.rand((cumulative.shape[0], 1), generator=generator, dtype=torch.float64)
    # side="right": the first label whose cumulative probability exceeds the number, never one of probability 0
    drawn = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    drawn = drawn.clamp_(max=cumulative.shape[-1] - 1)
    return drawn.reshape(log_probs.shape[:-1]).to(log_probs.device)


# the key of a weight's Fisher marginals taken in the file's layout (_Route.move), beside checkpoint tensor names
FILE_LAYOUT = ""


class _Route(NamedTuple):
    """How the reading route makes a GGUF weight of its checkpoint tensors, for moving gradients: by whole rows and
    columns (layout: SourceModel.element_layout), else element by element (move: SourceModel.element_moves), else
    neither (both None: the route computes; even error weights)."""

    layout: Optional[tuple[torch.Tensor, torch.Tensor]]
    move: Optional[Callable[[dict[str, torch.Tensor]], torch.Tensor]]


class _ExpertInputs(TorchFunctionMode):
    """While active, the inputs that reach each expert's slice of a 3-D expert weight go to `add(name, inputs,
    expert, n_experts)` for every GGUF weight of that parameter: transformers' eager experts take the weight's slice
    of one expert (weight[expert]) and multiply the tokens routed to it by that slice, so each expert's vector is
    counted by its own tokens, as llama-imatrix counts ggml_mul_mat_id's.

    The slice is followed in whatever form the module multiplies by it: F.linear(x, w) (Mixtral, Qwen-MoE: w is
    ffn x width), x @ w (gpt-oss: w is width x 2 ffn, gate and up interleaved in its columns), w @ x, and through
    transposes and dtype casts of the slice. Whatever the form, the dimension a product contracts is the weight's
    input, the file's columns (ggml_mul_mat's), so the input's vectors along it are what llama-imatrix squares."""

    LINEAR = (F.linear,)
    MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
    # views and copies of a slice that keep it the same expert's weight
    VIEWS = (torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.t, torch.t, torch.Tensor.transpose,
             torch.transpose, torch.Tensor.to, torch.Tensor.contiguous, torch.Tensor.float, torch.Tensor.type_as)

    def __init__(self, experts: dict[int, tuple[torch.Tensor, list[str]]], add: Callable):
        super().__init__()
        self.experts = experts
        self.add = add
        self.slices: dict[int, tuple[torch.Tensor, list[str], int, int]] = {}   # id(slice) -> (slice, names, ...)

    def _slice(self, tensor) -> Optional[tuple[torch.Tensor, list[str], int, int]]:
        found = self.slices.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return found if found is not None and found[0] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.experts:
            weight, names = self.experts[id(args[0])]
            index = args[1]
            if weight is args[0] and (isinstance(index, int) or isinstance(index, torch.Tensor) and index.numel() == 1
                                      and not index.is_floating_point()):
                # the slice is kept with its id, so that the id is not reused while it is looked up
                self.slices[id(result)] = (result, names, int(index), int(weight.shape[0]))
        elif func in self.VIEWS and args and isinstance(result, torch.Tensor) and self._slice(args[0]):
            self.slices[id(result)] = (result, *self._slice(args[0])[1:])
        elif func in self.LINEAR:
            found = self._slice(args[1] if len(args) > 1 else kwargs.get("weight"))
            if found:
                self._count(found, args[0] if args else kwargs["input"])
        elif func in self.MATMUL and len(args) >= 2:
            if self._slice(args[1]):                                    # x @ w: x's rows are the inputs
                self._count(self._slice(args[1]), args[0])
            elif self._slice(args[0]) and args[1].dim() >= 2:           # w @ x: x's columns are
                self._count(self._slice(args[0]), args[1].transpose(-1, -2))
        return result

    def _count(self, found: tuple[torch.Tensor, list[str], int, int], inputs: torch.Tensor) -> None:
        _, names, expert, n_experts = found
        for name in names:
            self.add(name, inputs, expert, n_experts)

    def __exit__(self, *exc_info):
        self.slices.clear()
        return super().__exit__(*exc_info)


class _Handles:
    """Hook handles removed when the context ends."""

    def __init__(self, handles: list):
        self.handles = handles

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()


def chunk_alphas(traces: list[float], norms: list, tokens_per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk alpha and alpha_weighted of one weight from its gradient norms (see the module docstring).

    alpha = ||W||^2 tr(F) / (2N). alpha_weighted = sum_ij F_ij W_ij^2 / 2 with F_ij = T r_i c_j (T = tr(F); r, c the
    Fisher's row and column sums over all chunks, normalised), that is T sum_ij r_i c_j W_ij^2 / 2 (norms[1]): each
    chunk's estimate scales the weights' shape, measured once over all chunks, by its own tr(F), so the spread is
    that of the chunks' traces."""
    norm2, weighted, numel = norms
    fisher = np.asarray(traces, dtype=np.float64) / tokens_per_chunk
    return norm2 * fisher / (2 * numel), fisher * weighted / 2
