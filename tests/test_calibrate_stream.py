"""Block-streaming calibration: the same measurements as the whole model, one block in memory, resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ewq_gguf import api
from ewq_gguf.calibrate import calibrate
from ewq_gguf.calibrate.runner import calibration_tokens
from ewq_gguf.calibrate.stream import StreamedModel
from ewq_gguf.calibrate.workfolder import work_folder_for
from ewq_gguf.constants import TOKEN_EMBEDDING
from ewq_gguf.source.model import open_checkpoint
from testkit.tiny_models import TINY, make_tiny_model

TOKENS, CTX = 256, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def text_file(calibration_text):
    return calibration_text


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    made = {}

    def folder(architecture: str):
        if architecture not in made:
            made[architecture] = make_tiny_model(tmp_path_factory.mktemp(architecture) / "tiny", architecture)
        return made[architecture]

    return folder


def whole_model_activations(folder, text: str):
    """Reference: the whole transformers model in memory, hooks on every linear layer and block; GGUF names."""
    source = open_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chunks = calibration_tokens(AutoTokenizer.from_pretrained(folder), text, TOKENS, CTX)
    sums, cos = {}, {}
    handles = []
    for hf_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = source.adapter.gguf_name(hf_name + ".weight")
            if module is model.get_output_embeddings() and name not in source.by_name:
                name = TOKEN_EMBEDDING       # a tied head: its input weighs the embedding's rows
            if name in source.by_name:
                def add(module, args, name=name):
                    flat = args[0].reshape(-1, args[0].shape[-1]).double()
                    sums[name] = sums.get(name, 0) + flat.pow(2).sum(0)
                handles.append(module.register_forward_pre_hook(add))
    for index, layer in enumerate(model.model.layers):
        def on_block(module, args, kwargs, output, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            cos.setdefault(index, []).append(F.cosine_similarity(hidden, out, dim=-1).double().reshape(-1))
        handles.append(layer.register_forward_hook(on_block, with_kwargs=True))
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=chunk[None], use_cache=False)
    for handle in handles:
        handle.remove()
    tokens = chunks.numel()
    vectors = {name: (total / tokens).float() for name, total in sums.items()}
    lim = [float(-torch.cat(cos[index]).mean()) for index in range(len(cos))]
    return vectors, lim


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_streamed_activations_equal_the_whole_model(tiny_folders, text_file, architecture):
    folder = tiny_folders(architecture)
    result = calibrate(folder, text_file, tokens=TOKENS, ctx=CTX, sensitivity_tokens=CTX, error_types=(),
                       device="cpu", progress=False)
    vectors, lim = whole_model_activations(folder, text_file.read_text())
    measured = result.imatrix.vectors()
    assert set(measured) == set(vectors)
    for name, vector in vectors.items():
        assert torch.allclose(measured[name], vector, rtol=1e-5, atol=1e-7), name
    assert np.allclose(result.lim, lim, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM"])
def test_gradient_sensitivities_agree_with_noise_injection(tiny_folders, text_file, architecture):
    """Every weight, the tied embedding included (Qwen3 and Gemma2 tie it to the head): the Fisher estimate of
    alpha and the noise-injection measurement on the same tokens rank the weights alike and agree in size."""
    folder = tiny_folders(architecture)
    options = dict(tokens=TOKENS, ctx=CTX, sensitivity_tokens=TOKENS, error_types=(), device="cpu", progress=False)
    fisher = calibrate(folder, text_file, sensitivity="fisher", **options)
    noise = calibrate(folder, text_file, sensitivity="noise", **options)
    assert set(fisher.sensitivity) == set(noise.sensitivity)
    names = sorted(noise.sensitivity)
    estimated = np.array([fisher.sensitivity[name].alpha for name in names])
    measured = np.array([noise.sensitivity[name].alpha for name in names])
    ranks = [np.argsort(np.argsort(values)) for values in (estimated, measured)]
    assert np.corrcoef(*ranks)[0, 1] >= 0.9
    assert np.all(np.abs(np.log(estimated / measured)) < np.log(1.5)), dict(zip(names, estimated / measured))
    for name in names:
        samples = fisher.sensitivity[name].samples
        assert len(samples) == TOKENS // CTX and np.mean(samples) == pytest.approx(fisher.sensitivity[name].alpha)
    assert fisher.sensitivity_method == "fisher" and fisher.sensitivity_tokens == TOKENS


def test_only_one_block_is_ever_in_memory(tiny_folders, text_file, monkeypatch):
    """Streaming: at no time are the weights of two blocks real (not on the meta device)."""
    most = []
    original = StreamedModel.block

    def block(self, index, requires_grad=False, dtype=None):
        real = [layer for layer in self.layers if any(not p.is_meta for p in layer.parameters())]
        most.append(len(real))
        return original(self, index, requires_grad, dtype)

    monkeypatch.setattr(StreamedModel, "block", block)
    calibrate(tiny_folders("LlamaForCausalLM"), text_file, tokens=TOKENS, ctx=CTX, sensitivity_tokens=CTX,
              error_types=(), device="cpu", progress=False)
    assert most and max(most) == 0     # when a block is read, none other is


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [("forward", 1), ("backward", 0)])
def test_an_interrupted_calibration_resumes_with_the_same_result(tiny_folders, text_file, tmp_path, monkeypatch,
                                                                 stop_at):
    folder = tiny_folders("LlamaForCausalLM")
    options = dict(text=text_file, tokens=TOKENS, ctx=CTX, sensitivity_tokens=2 * CTX, error_types=(),
                   device="cpu", progress=False)
    reference = api.calibrate(folder, tmp_path / "reference.json", **options)
    out = tmp_path / "calib.json"
    original = StreamedModel.block
    calls = []

    def failing_block(self, index, requires_grad=False, dtype=None):
        calls.append((index, requires_grad))
        if (("backward" if requires_grad else "forward"), index) == stop_at:
            raise Stop
        return original(self, index, requires_grad, dtype)

    monkeypatch.setattr(StreamedModel, "block", failing_block)
    with pytest.raises(Stop):
        api.calibrate(folder, out, **options)
    assert not out.exists() and work_folder_for(out).is_dir()
    monkeypatch.setattr(StreamedModel, "block", original)
    resumed_blocks = []
    monkeypatch.setattr(StreamedModel, "block", lambda self, index, requires_grad=False, dtype=None: (
        resumed_blocks.append((index, requires_grad)), original(self, index, requires_grad, dtype))[1])
    result = api.calibrate(folder, out, **options)
    assert not work_folder_for(out).exists()
    # the rerun did not redo the blocks finished before the interruption
    assert len(resumed_blocks) < 2 * open_checkpoint(folder).n_blocks
    assert result.lim == reference.lim
    assert result.sensitivity == reference.sensitivity
    for name, sums in reference.imatrix.sums.items():
        assert np.array_equal(result.imatrix.sums[name], sums), name
    saved = json.loads(out.read_text())
    assert saved["sensitivity"] == json.loads((tmp_path / "reference.json").read_text())["sensitivity"]


@pytest.mark.parametrize("architecture, name", [("LlamaForCausalLM", "output.weight"),
                                                ("LlamaForCausalLM", "token_embd.weight"),
                                                ("Qwen3ForCausalLM", "token_embd.weight"),    # Qwen3: tied
                                                ("LlamaForCausalLM", "blk.1.ffn_down.weight")])
def test_fisher_marginals_predict_an_error_on_a_few_rows(tiny_folders, text_file, architecture, name):
    """An error on a few rows (a vocabulary matrix's: those of the tokens the text uses most) costs what the Fisher
    information's row and column sums R, C predict, sum_ij R_i C_j d_ij^2 / (2 T) (small errors: the quadratic
    regime), which alpha_weighted * t2_weighted is; alpha, which spreads the error evenly, predicts far too little
    for the vocabulary's rows."""
    from ewq_gguf.calibrate.runner import ModelRunner, kl_per_token
    folder = tiny_folders(architecture)
    calibration = calibrate(folder, text_file, tokens=TOKENS, ctx=CTX, sensitivity_tokens=TOKENS, error_types=(),
                            device="cpu", progress=False)
    source = open_checkpoint(folder)
    runner = ModelRunner(folder, source, torch.device("cpu"))
    weight = next(w for w in runner.weights if w.name == name).parameter
    chunks = calibration_tokens(runner.tokenizer, text_file.read_text(), TOKENS, CTX)
    row_weights, column_weights = calibration.error_weights(name)
    # the rows of the 8 tokens the text uses most (chosen by counting, not by the estimate: the rows an estimate
    # ranks highest are also those its noise lifted); a block's first 8
    counts = torch.bincount(chunks.reshape(-1), minlength=weight.shape[0])
    rows = counts.argsort(descending=True)[:8] if name != "blk.1.ffn_down.weight" else torch.arange(8)
    generator = torch.Generator().manual_seed(1)
    delta = torch.zeros_like(weight)
    delta[rows] = torch.randn((len(rows), weight.shape[1]), generator=generator) * 0.02 * weight[rows].std()
    with torch.no_grad():
        base = torch.log_softmax(runner.model(input_ids=chunks).logits.float(), -1)
        original = weight.detach().clone()
        weight.add_(delta)
        measured = float(kl_per_token(base, runner.model(input_ids=chunks).logits).mean())
        weight.copy_(original)
    squares = delta.double().pow(2)
    predicted = float(row_weights @ squares @ column_weights) / float(row_weights.sum()) / 2
    assert predicted == pytest.approx(measured, rel=0.25)
    evenly = calibration.sensitivity[name].alpha * float(delta.pow(2).sum() / original.pow(2).sum())
    if name == "token_embd.weight":
        assert evenly < 0.5 * measured      # what alpha alone predicts for it: far too little
    # the same prediction as alpha_weighted times the error's weighted size
    t2_weighted = float(row_weights @ squares @ column_weights) / float(row_weights @ original.double().pow(2)
                                                                        @ column_weights)
    assert calibration.sensitivity[name].alpha_weighted * t2_weighted == pytest.approx(predicted, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu/calibrate.sh same)")
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_cuda_measures_what_the_cpu_measures(tiny_folders, text_file, compute_dtype):
    folder = tiny_folders("Qwen3ForCausalLM")
    options = dict(tokens=TOKENS, ctx=CTX, sensitivity_tokens=TOKENS, error_types=(), progress=False,
                   compute_dtype=compute_dtype)
    cpu, cuda = (calibrate(folder, text_file, device=device, **options) for device in ("cpu", "cuda"))
    tolerance = 1e-4 if compute_dtype == "float32" else 3e-2
    for name, vector in cpu.imatrix.vectors().items():
        assert torch.allclose(cuda.imatrix.vectors()[name], vector, rtol=tolerance), name
    assert np.allclose(cuda.lim, cpu.lim, atol=tolerance)
    for name, measured in cpu.sensitivity.items():
        assert cuda.sensitivity[name].alpha == pytest.approx(measured.alpha, rel=10 * tolerance), name


def test_a_killed_calibration_resumes_with_the_same_result(tmp_path):
    """SIGKILL mid-run (no handler can help): the rerun continues from the last finished block and ends with the
    result of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from testkit.tiny_tokenizers import SAMPLE_TEXT

    folder = make_tiny_model(tmp_path / "model", "LlamaForCausalLM", hidden_size=256, intermediate_size=768,
                             num_hidden_layers=8)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 40)
    arguments = ["--text", str(text), "--tokens", "2048", "--ctx", "128", "--sensitivity-tokens", "512",
                 "--no-errors", "--device", "cpu", "--threads", "1", "--quiet"]

    def command(out):
        return [sys.executable, "-m", "ewq_gguf", "calibrate", str(folder), "--out", str(out), *arguments]

    subprocess.run(command(tmp_path / "reference.json"), check=True, capture_output=True)
    out = tmp_path / "calib.json"
    state = work_folder_for(out) / "state.json"
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(state.read_text())["state"].get("forward", 0) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert process.poll() is None, "the calibration ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    finished = json.loads(state.read_text())["state"]["forward"]
    assert finished >= 3
    subprocess.run(command(out), check=True, capture_output=True)
    assert not work_folder_for(out).exists()
    reference, resumed = (json.loads(path.read_text()) for path in (tmp_path / "reference.json", out))
    for key in ("lim", "sensitivity", "row_fisher", "column_fisher", "tokens"):
        assert resumed[key] == reference[key], key
    assert (out.with_name("calib.imatrix.gguf").read_bytes()
            == (tmp_path / "reference.imatrix.gguf").read_bytes())


def test_bfloat16_blocks_measure_what_float32_blocks_do(tmp_path, text_file):
    """A bfloat16 checkpoint calibrated with bfloat16 blocks (the default where bfloat16 is fast) against the same
    checkpoint in float32 blocks: the same vectors and LIM to bfloat16's precision, and the same sensitivities (the
    chunks they rest on run in float32 blocks either way)."""
    folder = make_tiny_model(tmp_path / "bf16", "Gemma2ForCausalLM", dtype=torch.bfloat16)
    options = dict(tokens=TOKENS, ctx=CTX, sensitivity_tokens=CTX, error_types=(), device="cpu", progress=False)
    wide, narrow = (calibrate(folder, text_file, compute_dtype=dtype, **options) for dtype in ("float32", "bfloat16"))
    assert narrow.device == "cpu bfloat16" and wide.device == "cpu float32"
    for name, vector in wide.imatrix.vectors().items():
        assert torch.allclose(narrow.imatrix.vectors()[name], vector, rtol=5e-2, atol=1e-6), name
    assert np.allclose(narrow.lim, wide.lim, atol=2e-2)
    for name, measured in wide.sensitivity.items():
        assert narrow.sensitivity[name].alpha == pytest.approx(measured.alpha, rel=1e-5), name
        assert narrow.sensitivity[name].alpha_weighted == pytest.approx(measured.alpha_weighted, rel=1e-5), name


def test_tied_embedding_fisher_is_the_heads_plus_what_the_embedding_path_adds(tiny_folders, text_file):
    """A tied embedding's Fisher mass per chunk, recomputed on the whole model with the labels the calibration drew:
    on every element the head's mass in expectation over the labels, and on the rows of the chunk's tokens what the
    embedding's path adds to the sampled gradient, G^2 - H^2 (G the tied weight's whole gradient, H its head
    path's); summed over each row and each column. Each chunk's value is exact, not only its expectation: a head
    gradient that also carried the soft-cap slope's ones once made SmolLM2's chunks range from -52 to +71 around 15."""
    from ewq_gguf.calibrate.passes import sampled_labels

    folder = tiny_folders("Qwen3ForCausalLM")
    calibration = calibrate(folder, text_file, tokens=TOKENS, ctx=CTX, sensitivity_tokens=TOKENS, error_types=(),
                            device="cpu", compute_dtype="float32", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight
    chunks = calibration_tokens(AutoTokenizer.from_pretrained(folder), text_file.read_text(), TOKENS, CTX)
    captured = {}
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: captured.update(head=args[0][0]))
    samples, mass = [], torch.zeros(weight.shape, dtype=torch.float64)
    for index, chunk in enumerate(chunks):
        log_probs = torch.log_softmax(model(input_ids=chunk[None]).logits.float(), -1)[0]
        probabilities = log_probs.detach().exp()
        drawn = sampled_labels(log_probs, 0, index)[:, None]    # the labels BlockPasses draws (seed 0)
        whole, = torch.autograd.grad(-log_probs.gather(-1, drawn).sum(), weight)
        features = captured["head"].detach().double()
        head_path = (probabilities - F.one_hot(drawn[:, 0], weight.shape[0])).double().T @ features
        chunk_mass = (probabilities * (1 - probabilities)).double().T @ features.pow(2)
        tokens = torch.unique(chunk)
        chunk_mass[tokens] += whole[tokens].double().pow(2) - head_path[tokens].pow(2)
        mass += chunk_mass
        samples.append(float(weight.detach().double().pow(2).sum() * chunk_mass.sum() / CTX / (2 * weight.numel())))
    assert calibration.sensitivity[TOKEN_EMBEDDING].samples == pytest.approx(samples, rel=1e-4)
    assert np.allclose(calibration.row_fisher[TOKEN_EMBEDDING], mass.sum(1).numpy() / TOKENS, rtol=1e-4, atol=1e-12)
    assert np.allclose(calibration.column_fisher[TOKEN_EMBEDDING], mass.sum(0).numpy() / TOKENS, rtol=1e-4)
