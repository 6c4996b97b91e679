"""Calibration of mixture-of-experts models: per-expert importance vectors counted by routed tokens (as
llama-imatrix counts them), their GGUF imatrix file, gradients moved onto the file's expert tensors, and an optimal
plan whose file llama.cpp loads. Mixtral's experts multiply by F.linear with (ffn x width) slices; gpt-oss's by
x @ w with (width x 2 ffn) slices whose columns interleave gate and up, which llama.cpp's converter transposes and
splits into ffn_gate_exps and ffn_up_exps."""
from __future__ import annotations

import subprocess
import sys


import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ewq_gguf.calibrate import calibrate
from ewq_gguf.calibrate.imatrix import ImportanceMatrix
from ewq_gguf.calibrate.passes import sampled_labels
from ewq_gguf.calibrate.runner import calibration_tokens
from ewq_gguf.source.model import open_checkpoint
from llama_runner import gguf_logits
from testkit.resources import llama_tool
from testkit.tiny_models import make_tiny_model

TOKENS, CTX = 256, 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mixtral") / "tiny", "MixtralForCausalLM")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gpt-oss") / "tiny", "GptOssForCausalLM")


@pytest.fixture(scope="module")
def calibrated(mixtral, calibration_text):
    return calibrate(mixtral, calibration_text, tokens=TOKENS, ctx=CTX, sensitivity_tokens=CTX, error_types=(),
                     device="cpu", progress=False)


@pytest.fixture(scope="module")
def calibrated_gpt_oss(gpt_oss, calibration_text):
    # gradients on every chunk (in their order), for the whole-model reference of the Fisher sums
    return calibrate(gpt_oss, calibration_text, tokens=TOKENS, ctx=CTX, sensitivity_tokens=TOKENS, error_types=(),
                     device="cpu", compute_dtype="float32", progress=False)


def mixtral_down_input(module, expert, tokens):
    """Mixtral's SiLU GLU: gate_up_proj[expert] is (2 ffn x width), gate then up."""
    gate, up = (tokens @ module.gate_up_proj[expert].T).chunk(2, dim=-1)
    return F.silu(gate) * up


def gpt_oss_down_input(module, expert, tokens):
    """gpt-oss's clamped GLU: gate_up_proj[expert] is (width x 2 ffn), gate and up interleaved, with biases."""
    gate_up = tokens @ module.gate_up_proj[expert] + module.gate_up_proj_bias[expert]
    gate, up = gate_up[..., ::2].clamp(max=module.limit), gate_up[..., 1::2].clamp(-module.limit, module.limit)
    return (up + 1) * gate * torch.sigmoid(gate * module.alpha)


def whole_model_expert_sums(folder, text: str, down_input=mixtral_down_input):
    """Reference: the whole transformers model in memory; the tokens each expert's router picks, from the experts'
    own inputs, and the down projection's input computed here from each expert's weights (down_input)."""
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
            for kind in ("gate", "up"):
                add(f"blk.{block}.ffn_{kind}_exps.weight", expert, n_experts, tokens)
            add(f"blk.{block}.ffn_down_exps.weight", expert, n_experts, down_input(module, expert, tokens))

    for block, layer in enumerate(model.model.layers):
        layer.mlp.experts.register_forward_pre_hook(lambda module, args, block=block: on_experts(module, args, block))
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=chunk[None], use_cache=False)
    assert set(sums) == {spec.name for spec in source.specs if "_exps" in spec.name and spec.is_matrix}
    return sums, counts, chunks


@pytest.mark.parametrize("model, down_input", [("mixtral", mixtral_down_input), ("gpt_oss", gpt_oss_down_input)])
def test_expert_importance_is_counted_by_routed_tokens(model, down_input, calibration_text, request):
    folder = request.getfixturevalue(model)
    calibrated = request.getfixturevalue("calibrated" if model == "mixtral" else "calibrated_gpt_oss")
    sums, counts, chunks = whole_model_expert_sums(folder, calibration_text.read_text(), down_input)
    for name, reference in sums.items():
        assert calibrated.imatrix.counts[name].tolist() == counts[name].tolist(), name
        # each token goes to top-k experts: the counts add up to k per token
        assert counts[name].sum() == 2 * chunks.numel()
        assert np.allclose(calibrated.imatrix.sums[name], reference.numpy(), rtol=1e-5, atol=1e-7), name
        vector = calibrated.imatrix.vector(name).reshape(reference.shape)
        assert np.allclose(vector, (reference / counts[name][:, None]).numpy(), rtol=1e-5), name
    # a sensitivity for each whole stacked tensor
    assert set(sums) <= set(calibrated.sensitivity)


def test_gpt_oss_expert_fisher_sums_are_the_file_tensors(gpt_oss, calibration_text, calibrated_gpt_oss):
    """The Fisher row and column sums of gpt-oss's expert tensors, recomputed on the whole model with the labels the
    calibration drew, on the file's tensors: the gradient of the fused (experts x width x 2 ffn) gate_up_proj
    transposed and split into its even (gate) and odd (up) rows, down_proj's transposed (as llama.cpp's converter
    moves the weights). Neither is a move of whole rows and columns (SourceModel.element_layout), so the sums are
    taken on the gradient moved element by element (element_moves)."""
    model = AutoModelForCausalLM.from_pretrained(gpt_oss, dtype=torch.float32).eval()
    chunks = calibration_tokens(AutoTokenizer.from_pretrained(gpt_oss), calibration_text.read_text(), TOKENS, CTX)
    experts = [layer.mlp.experts for layer in model.model.layers]
    rows, columns = {}, {}
    for index, chunk in enumerate(chunks):
        log_probs = torch.log_softmax(model(input_ids=chunk[None]).logits.float(), -1)[0]
        drawn = sampled_labels(log_probs.detach(), 0, index)[..., None]    # the labels BlockPasses draws (seed 0)
        parameters = [weight for module in experts for weight in (module.gate_up_proj, module.down_proj)]
        gradients = torch.autograd.grad(-log_probs.gather(-1, drawn).sum(), parameters)
        for block in range(len(experts)):
            gate_up, down = (gradient.transpose(-1, -2).double() for gradient in gradients[2 * block:2 * block + 2])
            for kind, moved in (("gate", gate_up[:, ::2]), ("up", gate_up[:, 1::2]), ("down", down)):
                name = f"blk.{block}.ffn_{kind}_exps.weight"
                rows[name] = rows.get(name, 0) + moved.pow(2).sum(-1).reshape(-1)
                columns[name] = columns.get(name, 0) + moved.pow(2).sum((0, 1))
    assert set(rows) == {name for name in calibrated_gpt_oss.row_fisher if "_exps" in name}
    for name in rows:
        assert np.allclose(calibrated_gpt_oss.row_fisher[name], rows[name].numpy() / TOKENS, rtol=1e-3,
                           atol=1e-6 * float(rows[name].max()) / TOKENS), name
        assert np.allclose(calibrated_gpt_oss.column_fisher[name], columns[name].numpy() / TOKENS, rtol=1e-3), name
    assert rows["blk.0.ffn_gate_exps.weight"].shape == (4 * 512,)


@pytest.mark.parametrize("model", ["llama", "mixtral", "gpt_oss"])
def test_importance_vectors_equal_llama_imatrix(model, calibration_text, tmp_path, request):
    """Our importance vectors (per expert for the MoE models) equal llama-imatrix's on the same text and context,
    run on our F32 file of the same checkpoint. llama-imatrix lays chunks out its way (the text's tokens after one
    BOS, cut into chunks of ctx, each chunk's first token then set to BOS), which calibration_tokens follows. Its
    K/V cache is made F32 here: by default it is F16, whose rounding reaches the attention output's inputs and every
    later block (vectors about 6e-4 apart on the tiny Llama), while our blocks keep float32. Its router (ffn_gate_inp)
    vectors have no counterpart (routers stay F32), and our output head's is collected only with --process-output.
    Tolerance: both sides compute in float32 from the same float32 weights, so only the order of float32 sums
    differs: measured agreement about 1e-6 of each vector's largest value; 1e-4 leaves room for other CPUs' kernels."""
    if model == "llama":
        folder = make_tiny_model(tmp_path / "llama", "LlamaForCausalLM")
        ours = calibrate(folder, calibration_text, tokens=TOKENS, ctx=CTX, sensitivity_tokens=CTX, error_types=(),
                         device="cpu", progress=False)
    else:
        folder = request.getfixturevalue(model)
        ours = request.getfixturevalue("calibrated" if model == "mixtral" else "calibrated_gpt_oss")
    f32 = tmp_path / "f32.gguf"
    subprocess.run([sys.executable, "-m", "ewq_gguf", "convert", str(folder), str(f32), "--method", "uniform",
                    "--type", "F32"], check=True, capture_output=True)
    out = tmp_path / "imatrix.gguf"
    subprocess.run([str(llama_tool("llama-imatrix")), "-m", str(f32), "-f", str(calibration_text), "-c", str(CTX),
                    "-b", str(CTX), "--chunks", str(TOKENS // CTX), "--no-ppl", "-t", "1", "-fa", "off", "-ctk", "f32",
                    "-ctv", "f32", "-o", str(out)], check=True, capture_output=True)
    theirs = ImportanceMatrix.load(out)
    assert {name for name in theirs.sums if "ffn_gate_inp" not in name} == set(ours.imatrix.sums) - {"output.weight"}
    for name, sums in theirs.sums.items():
        if "ffn_gate_inp" in name:
            continue
        counts = theirs.counts[name]
        assert ours.imatrix.counts[name].tolist() == counts.tolist(), name
        if model != "llama" and "_exps" in name:
            assert len(counts) == 4, name            # one count per expert
        expected = sums.reshape(len(counts), -1) / counts[:, None]
        measured = ours.imatrix.sums[name].reshape(len(counts), -1) / counts[:, None]
        assert np.allclose(measured, expected, rtol=1e-4, atol=1e-4 * float(expected.max())), name


@pytest.mark.parametrize("model", ["mixtral", "gpt_oss"])
def test_noise_injection_measures_the_expert_tensors(model, calibration_text, calibrated, calibrated_gpt_oss,
                                                     request):
    """--sensitivity noise on a MoE: each expert tensor gets its own alpha, its noise put into its part of the fused
    parameter only (Mixtral's gate half, gpt-oss's even columns). Downstream of the last router (the last block's
    experts, the head) noise and Fisher agree (measured within 3%); upstream, noise also flips top-k routing, whose
    KL does not shrink with the noise (KL / t^2 grows as t falls), so there the noise alphas are 1.5x to 3.5x the
    Fisher ones on these models, and are not compared."""
    folder = request.getfixturevalue(model)
    fisher = calibrated if model == "mixtral" else calibrated_gpt_oss
    noise = calibrate(folder, calibration_text, tokens=TOKENS, ctx=CTX, sensitivity="noise",
                      sensitivity_tokens=TOKENS, error_types=(), device="cpu", progress=False)
    assert set(noise.sensitivity) == set(fisher.sensitivity)
    last = [name for name in noise.sensitivity if name.startswith("blk.1.ffn_") and "_exps" in name]
    assert len(last) == 3
    for name in [*last, "output.weight"]:
        ratio = fisher.sensitivity[name].alpha / noise.sensitivity[name].alpha
        assert abs(np.log(ratio)) < np.log(1.1), (name, ratio)


def test_noise_injection_finds_gpt_oss_gate_and_up_in_the_fused_parameter(gpt_oss):
    """Weight.elements: ffn_gate_exps[e, i, h] is gate_up_proj[e, h, 2i], ffn_up_exps[e, i, h] gate_up_proj[e, h,
    2i + 1], as llama.cpp's converter moves them."""
    from ewq_gguf.calibrate.runner import ModelRunner

    runner = ModelRunner(gpt_oss, open_checkpoint(gpt_oss), torch.device("cpu"))
    weights = {weight.name: weight for weight in runner.weights}
    parameter = runner.model.model.layers[0].mlp.experts.gate_up_proj
    for offset, kind in enumerate(("gate", "up")):
        weight = weights[f"blk.0.ffn_{kind}_exps.weight"]
        assert weight.parameter is parameter
        expected = parameter.detach().transpose(-1, -2)[:, offset::2]
        assert torch.equal(weight.in_file_layout(parameter.detach()), expected)
        assert int(weight.mask().sum()) == parameter.numel() // 2


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


@pytest.mark.parametrize("model", ["mixtral", "gpt_oss"])
def test_an_optimal_plan_of_a_moe_loads_in_llama_cpp(model, calibration_text, tmp_path, request):
    folder = request.getfixturevalue(model)
    calibration = tmp_path / "calibration.json"
    out = tmp_path / "optimal.gguf"
    common = [sys.executable, "-m", "ewq_gguf"]
    subprocess.run([*common, "calibrate", str(folder), "--text", str(calibration_text), "--tokens", str(TOKENS),
                    "--ctx", str(CTX), "--sensitivity-tokens", str(CTX), "--threads", "1", "--out",
                    str(calibration)], check=True, capture_output=True)
    done = subprocess.run([*common, "convert", str(folder), str(out), "--method", "optimal", "--target-bpw", "5",
                           "--calibration", str(calibration)], check=True, capture_output=True, text=True)
    assert "blk.1.ffn_down_exps.weight" in done.stdout        # the plan table shows the expert tensors
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(out).tensors}
    expert_types = {types[name] for name in types if "_exps.weight" in name}     # gpt-oss's expert biases stay F32
    assert len(expert_types) > 1 and all(qtype != gguf.GGMLQuantizationType.F32 for qtype in expert_types)
    logits = gguf_logits(out, list(range(5, 45)))
    assert np.isfinite(logits).all()
