"""convert --rounding gptq on a tiny model: the plan records each tensor's rounding, llama.cpp loads the file, and
no tensor's output error is worse than nearest rounding's."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from ewq_gguf.api import convert
from ewq_gguf.calibrate import calibrate
from ewq_gguf.calibrate.gptq_pass import NOTE_NO_BETTER, NOTE_NO_INPUTS, gptq_round
from ewq_gguf.constants import KEY_EWQ_PLAN
from ewq_gguf.errors import InputError
from ewq_gguf.plan.display import format_plan_summary
from ewq_gguf.plan.plan import GPTQ_RECIPE_HEADER
from ewq_gguf.source.model import open_checkpoint
from llama_runner import gguf_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calibration_file(tiny_llama, calibration_text, tmp_path_factory):
    torch.manual_seed(0)
    result = calibrate(tiny_llama, calibration_text, tokens=256, ctx=64, sensitivity_tokens=64, error_types=(),
                       device="cpu", progress=False)
    return result.save(tmp_path_factory.mktemp("calibration") / "calibration.json")


def _recorded_plan(path) -> dict:
    reader = gguf.GGUFReader(path)
    field = reader.fields[KEY_EWQ_PLAN]
    return json.loads(bytes(field.parts[field.data[0]]).decode())


def test_gptq_file_loads_and_records_its_rounding(tiny_llama, calibration_file, tmp_path):
    out = tmp_path / "gptq.gguf"
    recipe = tmp_path / "recipe.txt"
    result = convert(tiny_llama, out, "uniform", type="Q4_K", calibration=str(calibration_file), rounding="gptq",
                     plan_out=recipe, progress=False)
    entries = {entry.name: entry for entry in result.plan.entries}
    rounded = [entry for entry in entries.values() if entry.rounding == "gptq"]
    assert len(rounded) >= 10      # 2 blocks x 7 linear weights, a few may keep nearest
    assert all(entry.rounding_note == NOTE_NO_BETTER for entry in entries.values()
               if entry.name.startswith("blk.") and len(entry.shape) == 2 and entry.rounding != "gptq")
    assert entries["token_embd.weight"].rounding == "nearest"
    assert entries["token_embd.weight"].rounding_note == NOTE_NO_INPUTS
    assert f"GPTQ rounding on {len(rounded)} tensors" in format_plan_summary(result.plan)
    recorded = {entry["name"]: entry for entry in _recorded_plan(out)["entries"]}
    assert recorded["blk.0.attn_q.weight"]["rounding"] == entries["blk.0.attn_q.weight"].rounding
    assert recipe.read_text().splitlines()[0] == GPTQ_RECIPE_HEADER
    logits = gguf_logits(out, [1, 5, 9, 13, 17, 21])
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                       "IQ4_NL", "IQ4_XS", "MXFP4"])
def test_no_tensor_loses_to_nearest_on_its_output_error(tiny_llama, calibration_file, type_name):
    from ewq_gguf.api import make_plan
    from ewq_gguf.calibrate import Calibration

    model = open_checkpoint(tiny_llama)
    plan = make_plan(model, "uniform", type=type_name, progress=False)
    outcome = gptq_round(tiny_llama, model, plan, Calibration.load(calibration_file), tokens=128)
    assert len(outcome.objectives) == 15 and "output.weight" in outcome.objectives  # 2 x 7 weights, the head
    for name, (gptq, nearest) in outcome.objectives.items():
        kept = outcome.plan.by_name()[name].rounding
        assert (kept == "gptq") == (gptq < nearest), name
    total_gptq = sum(min(pair) for pair in outcome.objectives.values())
    assert total_gptq < sum(nearest for _, nearest in outcome.objectives.values())


def test_gptq_needs_a_calibration(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="--calibration"):
        convert(tiny_llama, tmp_path / "x.gguf", "uniform", type="Q4_K", rounding="gptq", progress=False)


def test_plans_keep_their_rounding_and_a_nearest_file_says_nearest(tiny_llama, calibration_file, tmp_path):
    from ewq_gguf.plan import Plan

    plan_path = tmp_path / "plan.json"
    dry = convert(tiny_llama, tmp_path / "dry.gguf", "uniform", type="Q6_K", calibration=str(calibration_file),
                  rounding="gptq", dry_run=True, plan_out=plan_path, progress=False)
    assert dry.plan.by_name()["blk.1.ffn_down.weight"].rounding == "gptq"
    reread = Plan.from_json(plan_path.read_text())
    assert reread == dry.plan
    nearest = convert(tiny_llama, tmp_path / "nearest.gguf", plan=plan_path, progress=False)
    assert all(entry.rounding == "nearest" and not entry.rounding_note for entry in nearest.plan.entries)
    assert "rounding" not in json.dumps(_recorded_plan(tmp_path / "nearest.gguf"))


def test_cli_rounding_gptq(tiny_llama, calibration_file, tmp_path):
    from click.testing import CliRunner

    from ewq_gguf.cli import main

    out = tmp_path / "cli.gguf"
    args = ["convert", str(tiny_llama), str(out), "--type", "Q8_0", "--rounding", "gptq", "--gptq-tokens", "64",
            "--device", "cpu", "--quiet"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "--calibration" in refused.output
    done = CliRunner().invoke(main, [*args, "--calibration", str(calibration_file)])
    assert done.exit_code == 0, done.output
    assert out.exists() and not out.with_name(out.name + ".work").exists()   # the work folder goes with success


def test_sequential_inputs_through_the_rounded_blocks(tiny_llama, calibration_file):
    from ewq_gguf.api import make_plan
    from ewq_gguf.calibrate import Calibration
    from ewq_gguf.calibrate.gptq_pass import _row_order

    model = open_checkpoint(tiny_llama)
    order = _row_order(model, "blk.0.attn_q.weight", 256, 256)
    assert order is not None and not torch.equal(order, torch.arange(256))    # llama's Q rows are permuted
    assert torch.equal(_row_order(model, "blk.0.ffn_down.weight", 256, 512), torch.arange(256))
    plan = make_plan(model, "uniform", type="Q4_K", progress=False)
    calibration = Calibration.load(calibration_file)
    plain = gptq_round(tiny_llama, model, plan, calibration, tokens=128)
    sequential = gptq_round(tiny_llama, model, plan, calibration, tokens=128, sequential=True)
    # block 0 sees the same inputs either way; block 1 sees those of the rounded block 0
    assert np.array_equal(plain.encoded["blk.0.ffn_up.weight"], sequential.encoded["blk.0.ffn_up.weight"])
    assert not np.array_equal(plain.encoded["blk.1.ffn_up.weight"], sequential.encoded["blk.1.ffn_up.weight"])
    assert sequential.plan.params["gptq_sequential"] is True


def test_target_size_counts_the_rounding_records(tiny_llama, calibration_file, tmp_path):
    """--rounding gptq records the rounding of every tensor in the plan the header carries: an optimal plan at a
    whole-file size still fits it with them."""
    low = convert(tiny_llama, tmp_path / "low.gguf", "uniform", type="Q4_K", dry_run=True, progress=False).bytes
    high = convert(tiny_llama, tmp_path / "high.gguf", "uniform", type="Q8_0", dry_run=True, progress=False).bytes
    target = (low + high) // 2
    out = tmp_path / "gptq.gguf"
    result = convert(tiny_llama, out, "optimal", target_size=target, calibration=str(calibration_file),
                     rounding="gptq", progress=False)
    assert sum(entry.rounding == "gptq" for entry in result.plan.entries) > 0
    assert result.bytes == out.stat().st_size <= target


def test_an_interrupted_rounding_resumes_with_the_same_bytes(tiny_llama, calibration_file, tmp_path, monkeypatch):
    """A run stopped after block 0 leaves its work folder; the same arguments continue from block 1 (block 0's
    weights are not rounded again) and give the bytes of an uninterrupted run."""
    from ewq_gguf.api import make_plan
    from ewq_gguf.calibrate import Calibration
    from ewq_gguf.calibrate import gptq_pass

    model = open_checkpoint(tiny_llama)
    plan = make_plan(model, "uniform", type="Q4_K", progress=False)
    calibration = Calibration.load(calibration_file)
    reference = gptq_round(tiny_llama, model, plan, calibration, tokens=128, sequential=True)
    rounded: list[str] = []
    original = gptq_pass.gptq_quantize

    def stopping(weight, hessian, qtype, importance, damp):
        if len(rounded) == 7:                   # block 0's seven weights are done
            raise KeyboardInterrupt
        rounded.append(qtype)
        return original(weight, hessian, qtype, importance, damp)

    monkeypatch.setattr(gptq_pass, "gptq_quantize", stopping)
    with pytest.raises(KeyboardInterrupt):
        gptq_round(tiny_llama, model, plan, calibration, tokens=128, sequential=True, work_dir=tmp_path / "work")
    monkeypatch.setattr(gptq_pass, "gptq_quantize", lambda *args: (rounded.append(args[2]), original(*args))[1])
    resumed = gptq_round(tiny_llama, model, plan, calibration, tokens=128, sequential=True, work_dir=tmp_path / "work")
    assert len(rounded) == 15                   # 7, then block 1's 7 and the head
    assert sorted(resumed.encoded) == sorted(reference.encoded)
    for name in reference.encoded:
        assert np.array_equal(resumed.encoded[name], reference.encoded[name]), name
    assert resumed.objectives == reference.objectives and resumed.plan == reference.plan


def test_experts_are_rounded_each_with_the_inputs_routed_to_it(calibration_text, tmp_path, monkeypatch):
    """A tiny Mixtral: each expert's matrix is rounded with X^T X of the tokens its router sent it, whose diagonal is
    that expert's importance sums (which equal llama-imatrix's, tests/test_calibrate_moe.py); each expert keeps the
    better rounding, so no stacked tensor is worse than nearest; llama.cpp loads the file."""
    from ewq_gguf.api import make_plan
    from ewq_gguf.calibrate import gptq_pass
    from testkit.tiny_models import make_tiny_model

    folder = make_tiny_model(tmp_path / "mixtral", "MixtralForCausalLM")
    calibration = calibrate(folder, calibration_text, tokens=256, ctx=64, sensitivity_tokens=64, error_types=(),
                            device="cpu", compute_dtype="float32", progress=False)
    model = open_checkpoint(folder)
    plan = make_plan(model, "uniform", type="Q4_K", progress=False)
    seen: dict[str, object] = {}
    original = gptq_pass._Hessians.matrices
    monkeypatch.setattr(gptq_pass._Hessians, "matrices", lambda self: seen.update(original(self)) or original(self))
    outcome = gptq_round(folder, model, plan, calibration, tokens=256)
    experts = [name for name in seen if "_exps" in name]
    assert len(experts) == 2 * 3                                        # 2 blocks x gate, up, down
    for name in experts:
        sums = calibration.imatrix.sums[name]
        for expert, hessian in enumerate(seen[name]):
            if hessian is None:
                assert calibration.imatrix.counts[name][expert] == 0
                continue
            assert np.allclose(hessian.diagonal().numpy(), sums[expert], rtol=1e-4, atol=1e-6), (name, expert)
        gptq, nearest = outcome.objectives[name]
        assert gptq <= nearest
        assert outcome.plan.by_name()[name].rounding == ("gptq" if gptq < nearest else "nearest")
    assert sum(outcome.plan.by_name()[name].rounding == "gptq" for name in experts) >= 4
    out = tmp_path / "mixtral-gptq.gguf"
    convert(folder, out, "uniform", type="Q4_K", calibration=calibration, rounding="gptq", gptq_tokens=256,
            progress=False)
    assert np.isfinite(gguf_logits(out, [1, 5, 9, 13, 17, 21])).all()
