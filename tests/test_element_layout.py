"""SourceModel.element_layout: where each row and column of a file's tensor comes from in the checkpoint, for both
reading routes (our adapters: q and k rows permuted for llama.cpp; llama.cpp's converter: experts stacked, fused
tensors split). The calibration moves the Fisher information's row and column sums with it (calibrate/passes.py)."""
from __future__ import annotations

import pytest
import torch

from ewq_gguf.source.checkpoint import Checkpoint
from ewq_gguf.source.model import open_checkpoint
from testkit.tiny_models import make_tiny_model


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
                                          "Qwen3MoeForCausalLM", "OlmoeForCausalLM"])
def test_rows_and_columns_are_found_where_the_route_puts_them(tmp_path, architecture):
    folder = make_tiny_model(tmp_path / "hf", architecture)
    model, checkpoint = open_checkpoint(folder), Checkpoint(folder)
    matrices = [spec for spec in model.specs if spec.is_matrix and spec.name.startswith("blk.")]
    permuted = 0
    for spec in matrices:
        names = [name for name in spec.source.split("+") if name in checkpoint.records]
        pieces = {name: checkpoint.load(name).float() for name in names}
        layout = model.element_layout(spec, {name: tuple(piece.shape) for name, piece in pieces.items()})
        assert layout is not None, spec.name
        row_of, column_of = layout
        stacked = torch.cat([piece.reshape(-1, piece.shape[-1]) for piece in pieces.values()])
        assert torch.equal(model.load(spec).float().reshape(-1, spec.shape[-1]), stacked[row_of][:, column_of])
        permuted += not torch.equal(row_of, torch.arange(len(row_of)))
    # llama's q and k rows are permuted for llama.cpp's rope; the others come in order
    assert permuted >= (2 * model.n_blocks if architecture in ("LlamaForCausalLM", "MixtralForCausalLM") else 0)
    if architecture.endswith(("MoeForCausalLM", "MixtralForCausalLM")):
        assert any(len(spec.shape) == 3 for spec in matrices)


def test_a_route_that_mixes_elements_has_no_layout(tmp_path):
    """A transform that is no move of whole rows and columns (here a transpose of a square matrix) gives None."""
    folder = make_tiny_model(tmp_path / "hf", "LlamaForCausalLM")
    model = open_checkpoint(folder)
    spec = next(spec for spec in model.specs if spec.name.endswith("attn_output.weight"))
    model.adapter.transform = lambda name, tensor: tensor.transpose(-1, -2)
    assert model.element_layout(spec, {spec.source: spec.shape}) is None


def test_gpt_oss_expert_tensors_are_moved_element_by_element(tmp_path):
    """gpt-oss's fused (experts x width x 2 ffn) gate_up_proj becomes ffn_gate_exps and ffn_up_exps (experts x ffn x
    width) by a transpose and every other column, down_proj ffn_down_exps by a transpose: no move of whole rows and
    columns (element_layout: None), a move of single elements (element_moves), which puts other values (a gradient)
    where the route puts the weights."""
    folder = make_tiny_model(tmp_path / "hf", "GptOssForCausalLM")
    model, checkpoint = open_checkpoint(folder), Checkpoint(folder)
    experts = [spec for spec in model.specs if spec.is_matrix and "_exps" in spec.name]
    assert len(experts) == 3 * model.n_blocks
    for spec in experts:
        shapes = {spec.source: tuple(checkpoint.records[spec.source].shape)}
        assert model.element_layout(spec, shapes) is None, spec.name
        move = model.element_moves(spec, shapes)
        assert move is not None, spec.name
        assert torch.equal(move({spec.source: checkpoint.load(spec.source).float()}), model.load(spec).float())


def test_a_route_that_computes_moves_no_elements(tmp_path):
    """A transposed weight is a move of elements; one with something added to it is not."""
    folder = make_tiny_model(tmp_path / "hf", "LlamaForCausalLM")
    model = open_checkpoint(folder)
    spec = next(spec for spec in model.specs if spec.name.endswith("attn_output.weight"))
    model.adapter.transform = lambda name, tensor: tensor.transpose(-1, -2)
    assert model.element_moves(spec, {spec.source: spec.shape}) is not None
    model.adapter.transform = lambda name, tensor: tensor + tensor.roll(1, -1)
    assert model.element_moves(spec, {spec.source: spec.shape}) is None
