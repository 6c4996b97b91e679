"""Calibration of mixture-of-experts models: per-expert importance vectors counted by routed tokens (as
llama-imatrix counts them), their GGUF imatrix file, and an optimal plan whose file llama.cpp loads."""
from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ewq_gguf.calibrate import calibrate
from ewq_gguf.calibrate.imatrix import ImportanceMatrix
from ewq_gguf.calibrate.runner import calibration_tokens
from ewq_gguf.source.model import open_checkpoint
from llama_runner import gguf_logits
from testkit.tiny_models import make_tiny_model

TOKENS, CTX = 256, 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mixtral") / "tiny", "MixtralForCausalLM")


@pytest.fixture(scope="module")
def calibrated(mixtral, calibration_text):
    return calibrate(mixtral, calibration_text, tokens=TOKENS, ctx=CTX, sensitivity_tokens=CTX, error_types=(),
                     device="cpu", progress=False)


def whole_model_expert_sums(folder, text: str):
    """Reference: the whole transformers model in memory; the tokens each expert's router picks, from the experts'
    own inputs, and the down projection's input computed here from each expert's weights (Mixtral's SiLU GLU)."""
    source = open_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chunks = calibration_tokens(AutoTokenizer.from_pretrained(folder), text, TOKENS, CTX)
    sums, counts = {}, {}

    def add(name, expert, n_experts, inputs):
        sums.setdefault(name, torch.zeros(n_experts, inputs.shape[-1], dtype=torch.float64))
        counts.setdefault(name, torch.zeros(n_experts, dtype=torch.float64))
        sums[name][expert] += inputs.double().pow(2).sum(0)
        counts[name][expert] += inputs.shape[0]

    def on_experts(module, args, block):
        hidden, top_k_index = args[0], args[1]
        n_experts = module.gate_up_proj.shape[0]
        for expert in range(n_experts):
            tokens = hidden[(top_k_index == expert).any(-1)]
            gate, up = (tokens @ module.gate_up_proj[expert].T).chunk(2, dim=-1)
            for kind in ("gate", "up"):
                add(f"blk.{block}.ffn_{kind}_exps.weight", expert, n_experts, tokens)
            add(f"blk.{block}.ffn_down_exps.weight", expert, n_experts, torch.nn.functional.silu(gate) * up)

    for block, layer in enumerate(model.model.layers):
        layer.mlp.experts.register_forward_pre_hook(lambda module, args, block=block: on_experts(module, args, block))
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=chunk[None], use_cache=False)
    assert set(sums) == {spec.name for spec in source.specs if "_exps" in spec.name}
    return sums, counts, chunks


def test_expert_importance_is_counted_by_routed_tokens(mixtral, calibration_text, calibrated):
    sums, counts, chunks = whole_model_expert_sums(mixtral, calibration_text.read_text())
    for name, reference in sums.items():
        assert calibrated.imatrix.counts[name].tolist() == counts[name].tolist(), name
        # each token goes to top-k experts: the counts add up to k per token
        assert counts[name].sum() == 2 * chunks.numel()
        assert np.allclose(calibrated.imatrix.sums[name], reference.numpy(), rtol=1e-5, atol=1e-7), name
        vector = calibrated.imatrix.vector(name).reshape(reference.shape)
        assert np.allclose(vector, (reference / counts[name][:, None]).numpy(), rtol=1e-5), name
    # a sensitivity for each whole stacked tensor
    assert set(sums) <= set(calibrated.sensitivity)


def test_expert_importance_round_trips_through_the_imatrix_gguf(calibrated, tmp_path):
    path = calibrated.imatrix.save(tmp_path / "imatrix.gguf")
    reader = gguf.GGUFReader(path)
    counts = {tensor.name: tensor for tensor in reader.tensors}["blk.0.ffn_down_exps.weight.counts"]
    assert int(counts.n_elements) == 4          # llama-imatrix's layout: one count per expert
    loaded = ImportanceMatrix.load(path)
    assert set(loaded.sums) == set(calibrated.imatrix.sums)
    for name, sums in calibrated.imatrix.sums.items():
        assert loaded.sums[name].shape == sums.shape
        assert np.allclose(loaded.sums[name], sums, rtol=1e-6)
        assert loaded.counts[name].tolist() == calibrated.imatrix.counts[name].tolist()


def test_an_optimal_plan_of_a_moe_loads_in_llama_cpp(mixtral, calibration_text, tmp_path):
    calibration = tmp_path / "calibration.json"
    out = tmp_path / "optimal.gguf"
    common = [sys.executable, "-m", "ewq_gguf"]
    subprocess.run([*common, "calibrate", str(mixtral), "--text", str(calibration_text), "--tokens", str(TOKENS),
                    "--ctx", str(CTX), "--sensitivity-tokens", str(CTX), "--threads", "1", "--out",
                    str(calibration)], check=True, capture_output=True)
    done = subprocess.run([*common, "convert", str(mixtral), str(out), "--method", "optimal", "--target-bpw", "5",
                           "--calibration", str(calibration)], check=True, capture_output=True, text=True)
    assert "blk.1.ffn_down_exps.weight" in done.stdout        # the plan table shows the expert tensors
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(out).tensors}
    expert_types = {types[name] for name in types if "_exps" in name}
    assert len(expert_types) > 1 and all(qtype != gguf.GGMLQuantizationType.F32 for qtype in expert_types)
    logits = gguf_logits(out, list(range(5, 45)))
    assert np.isfinite(logits).all()
