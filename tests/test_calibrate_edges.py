"""Calibration at its edges: all-zero weights, a text shorter than asked for, a model the GPU cannot hold."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ewq_gguf.api import make_plan
from ewq_gguf.calibrate import CalibrationWarning, calibrate
from ewq_gguf.calibrate.quant_error import relative_errors
from ewq_gguf.calibrate.runner import _placement
from ewq_gguf.errors import InputError
from ewq_gguf.gguf_file.header import planned_file_size
from ewq_gguf.quant import QType
from ewq_gguf.source.model import open_checkpoint
from testkit.tiny_models import make_tiny_model
from testkit.tiny_tokenizers import SAMPLE_TEXT

ZERO_WEIGHT = "model.layers.1.mlp.down_proj.weight"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    """A text of a few thousand tokens of the tiny tokenizer."""
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(SAMPLE_TEXT * 2)
    return path


@pytest.fixture(scope="module")
def zero_weight_model(tmp_path_factory) -> Path:
    """A tiny Llama with one all-zero matrix (block 1's FFN down projection)."""
    folder = make_tiny_model(tmp_path_factory.mktemp("zero-weight"), "LlamaForCausalLM")
    weights = load_file(folder / "model.safetensors")
    weights[ZERO_WEIGHT] = torch.zeros_like(weights[ZERO_WEIGHT])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.Q4_K, QType.Q6_K, QType.IQ4_NL, QType.F16],
                         ids=lambda t: t.name)
def test_an_all_zero_weight_has_no_error(qtype):
    """Zeros are stored exactly in every type: relative error 0, not 0/0."""
    assert relative_errors(torch.zeros(4, 256), qtype, None, torch.rand(4), torch.rand(256)) == (0.0, 0.0)


def test_optimal_plan_of_a_model_with_an_all_zero_weight(zero_weight_model, short_text):
    """The zero matrix costs nothing in any type, so the plan predicts a finite KL and fits its size."""
    calibration = calibrate(zero_weight_model, short_text, tokens=128, ctx=64, sensitivity_tokens=64,
                            error_types=(QType.Q8_0, QType.Q4_K), device="cpu", progress=False)
    assert calibration.errors["plain"]["blk.1.ffn_down.weight"]["Q4_K"] == [0.0, 0.0]
    model = open_checkpoint(zero_weight_model)
    smallest = make_plan(model, type="Q4_K")
    target = planned_file_size(model, smallest) + 100_000
    plan = make_plan(model, "optimal", calibration=calibration, types="Q4_K,Q8_0", target_size=target,
                     progress=False)
    assert math.isfinite(plan.params["predicted_kld"])
    assert planned_file_size(model, plan) <= target
    assert plan.by_name()["blk.1.ffn_down.weight"].type == QType.Q4_K     # no error: the smallest type


def test_a_text_shorter_than_asked_for_warns_and_records_the_real_count(tiny_llama, short_text, tmp_path):
    with pytest.warns(CalibrationWarning) as caught:
        calibration = calibrate(tiny_llama, short_text, tokens=100_000, ctx=64, sensitivity_tokens=64,
                                error_types=(), device="cpu", progress=False)
    real = calibration.tokens
    assert 0 < real < 100_000 and real % 64 == 0
    assert [str(warning.message) for warning in caught] == [
        f"calibrating on {real} tokens, fewer than the 100000 asked for (--tokens): {short_text} holds only "
        f"{real // 64} chunks of 64"]
    # the activations really ran over that many tokens, and the file says so
    assert calibration.imatrix.counts["blk.0.attn_q.weight"][0] == real
    assert json.loads(calibration.save(tmp_path / "calib.json").read_text())["tokens"] == real


def test_a_text_long_enough_does_not_warn(tiny_llama, short_text):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        calibration = calibrate(tiny_llama, short_text, tokens=128, ctx=64, sensitivity_tokens=64,
                                error_types=(), device="cpu", progress=False)
    assert calibration.tokens == 128


def test_a_model_the_gpu_cannot_hold_is_refused(tiny_llama, monkeypatch):
    """Offloaded weights (device_map="auto") are meta tensors between forwards, which noise injection fails on: a
    model that does not fit the GPU is refused, with the way out."""
    weights = sum(path.stat().st_size for path in tiny_llama.glob("*.safetensors"))
    free = [4 * weights]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * 10**9))
    assert _placement(tiny_llama, torch.device("cuda")) == {"device_map": {"": "cuda"}}
    free[0] = weights
    with pytest.raises(InputError, match=r"the model does not fit cuda for calibration: .*; use --device cpu$"):
        _placement(tiny_llama, torch.device("cuda"))
