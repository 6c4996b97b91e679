"""Calibration on tiny models: LIM, importance vectors, noise-injection sensitivities, and the plans made from them."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ewq_gguf.api import convert
from ewq_gguf.calibrate import Calibration, calibrate, load_importance
from ewq_gguf.calibrate.engine import spread_first
from ewq_gguf.calibrate.quant_error import RowStrata, relative_errors
from ewq_gguf.calibrate.runner import ModelRunner, calibration_tokens
from ewq_gguf.calibrate.sensitivity import measure_sensitivities, slope_through_origin
from ewq_gguf.errors import InputError
from ewq_gguf.calibrate.imatrix import ImportanceMatrix
from ewq_gguf.plan.display import format_plan_summary
from ewq_gguf.quant import QType
from ewq_gguf.source.model import open_checkpoint
from testkit.tiny_models import make_tiny_model

TYPES = (QType.Q8_0, QType.Q4_0, QType.Q4_K, QType.Q6_K, QType.F16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def text_file(calibration_text) -> Path:
    return calibration_text


@pytest.fixture(scope="module")
def identity_block_model(tmp_path_factory) -> Path:
    """A tiny Llama whose block 1 adds nothing to the residual stream: its attention output and FFN down
    projections are zero, so the block's output is its input."""
    folder = make_tiny_model(tmp_path_factory.mktemp("identity-block"), "LlamaForCausalLM")
    weights = load_file(folder / "model.safetensors")
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        weights[name] = torch.zeros_like(weights[name])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def calibration(tiny_llama, text_file) -> Calibration:
    torch.manual_seed(0)
    return calibrate(tiny_llama, text_file, tokens=256, ctx=64, sensitivity_tokens=128, error_types=TYPES,
                     device="cpu", progress=False)


def test_lim_of_an_identity_block_is_minus_one(identity_block_model, text_file):
    result = calibrate(identity_block_model, text_file, tokens=128, ctx=64, sensitivity_tokens=64, error_types=(),
                       device="cpu", progress=False)
    assert result.lim[1] == pytest.approx(-1.0, abs=1e-6)
    assert result.lim[0] > -0.999     # block 0 does change its input
    # planted zero sensitivity: block 1's attention output is multiplied by a zero matrix, so noise in its
    # query, key and value weights cannot reach the output; the zero matrices themselves get no noise at all
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_down"):
        assert result.sensitivity[f"blk.1.{name}.weight"].alpha == 0.0
    assert result.sensitivity["blk.0.attn_q.weight"].alpha > 0


def test_head_sensitivity_matches_its_closed_form(tiny_llama, text_file):
    """Planted: for the output head z = W h, Gaussian noise E with ||E|| = t ||W|| gives, to second order,
    E[KL] = t^2 * 0.5 * ||W||^2 / numel * mean over tokens of ||h||^2 (1 - sum_v p_v^2). The noise-injection
    slope must recover that alpha."""
    source = open_checkpoint(tiny_llama)
    runner = ModelRunner(tiny_llama, source, torch.device("cpu"))
    ids = calibration_tokens(runner.tokenizer, text_file.read_text(), 512, 128)[:4]
    head = next(weight for weight in runner.weights if weight.name == "output.weight")
    with torch.no_grad():
        hidden = runner.decoder(input_ids=ids, use_cache=False).last_hidden_state
        probs = torch.softmax(runner.model.lm_head(hidden), dim=-1)
    weight = head.parameter.detach()
    expected = float(0.5 * weight.pow(2).sum() / weight.numel()
                     * (hidden.pow(2).sum(-1) * (1 - probs.pow(2).sum(-1))).mean())
    measured = measure_sensitivities(runner, ids, [0.02, 0.04], lambda name: None, progress=False,
                                     weights=[head])["output.weight"]
    assert measured.alpha == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("n_chunks, n_sampled, first", [(64, 8, [4, 12, 20, 28, 36, 44, 52, 60]), (5, 2, [1, 3]),
                                                       (3, 3, [0, 1, 2]), (7, 1, [3])])
def test_sensitivity_chunks_are_spread_over_the_text(n_chunks, n_sampled, first):
    """The chunks sensitivities rest on come first, one from the middle of each equal stretch of the text (never
    only its start, a title page or table of contents); the order is a permutation of all chunks."""
    order = spread_first(n_chunks, n_sampled).tolist()
    assert order[:n_sampled] == first
    assert sorted(order) == list(range(n_chunks))
    assert order[n_sampled:] == sorted(order[n_sampled:])


def test_two_row_strata_measure_a_weight_whose_mass_sits_on_a_few_rows():
    """Most of a weight's Fisher mass on two rows whose values have outliers (a larger relative error than the
    rest's): the heavy rows measured exactly plus an even sample of the others give the whole weight's weighted
    error, where an even sample of as many rows misses them; with rows enough for all, the strata are exact."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn((512, 256), generator=generator)
    heavy = [7, 300]
    # Student's t with 2 degrees of freedom: a normal over the root of a mean of 2 squared normals
    weight[heavy] = torch.randn((2, 256), generator=generator) / (
        torch.randn((2, 256, 2), generator=generator).pow(2).mean(-1).sqrt())
    row_weights = torch.ones(512, dtype=torch.float64)
    row_weights[heavy] = 1000.0
    column_weights = torch.rand(256, generator=generator).double()
    exact = relative_errors(weight, QType.Q4_0, None, row_weights, column_weights)
    strata = RowStrata(weight, row_weights, column_weights, n_rows=32).errors(QType.Q4_0, None)
    assert strata == pytest.approx(exact, rel=0.03)
    even = torch.linspace(0, 511, 32).round().long()
    sampled = relative_errors(weight[even], QType.Q4_0, None, row_weights[even], column_weights)[1]
    assert abs(sampled / exact[1] - 1) > 0.2
    assert RowStrata(weight, row_weights, column_weights, n_rows=512).errors(QType.Q4_0, None) == pytest.approx(exact)


def test_slope_fit_recovers_a_planted_quadratic():
    levels = np.array([0.03, 0.05, 0.1])
    assert slope_through_origin(levels**2, 2.5 * levels**2) == pytest.approx(2.5)


def test_importance_vectors_are_mean_squared_inputs(calibration, tiny_llama, text_file):
    vectors = calibration.imatrix.vectors()
    # q, k and v read the same normed input, as do gate and up: one vector each
    assert torch.equal(vectors["blk.0.attn_q.weight"], vectors["blk.0.attn_k.weight"])
    assert torch.equal(vectors["blk.1.ffn_gate.weight"], vectors["blk.1.ffn_up.weight"])
    assert calibration.imatrix.counts["blk.0.attn_q.weight"][0] == calibration.tokens
    # the head's input is the decoder's output: recompute its mean square independently
    source = open_checkpoint(tiny_llama)
    runner = ModelRunner(tiny_llama, source, torch.device("cpu"))
    chunks = calibration_tokens(runner.tokenizer, text_file.read_text(), 256, 64)
    with torch.no_grad():
        hidden = torch.cat([runner.decoder(input_ids=chunk[None], use_cache=False).last_hidden_state[0]
                            for chunk in chunks])
    assert np.allclose(vectors["output.weight"].numpy(), hidden.pow(2).mean(0).numpy(), rtol=1e-4)


def test_calibration_round_trip(calibration, tmp_path):
    path = calibration.save(tmp_path / "calib.json")
    loaded = Calibration.load(path)
    assert loaded.lim == calibration.lim
    assert loaded.sensitivity == calibration.sensitivity
    assert loaded.errors == calibration.errors
    for name in calibration.imatrix.sums:
        assert np.allclose(loaded.imatrix.vector(name), calibration.imatrix.vector(name))


def test_imatrix_gguf_round_trip(tmp_path):
    matrix = ImportanceMatrix(datasets=["a.txt"], chunk_count=3, chunk_size=512)
    matrix.add("blk.0.attn_q.weight", np.arange(64.0), 100)
    matrix.add("blk.0.attn_q.weight", np.ones(64), 28)
    matrix.add("output.weight", np.full(64, 2.0), 4)
    loaded = ImportanceMatrix.load(matrix.save(tmp_path / "m.imatrix.gguf"))
    assert loaded.datasets == ["a.txt"] and loaded.chunk_count == 3 and loaded.chunk_size == 512
    assert np.allclose(loaded.vector("blk.0.attn_q.weight"), (np.arange(64.0) + 1) / 128)
    assert np.allclose(loaded.vector("output.weight"), 0.5)
    reader = gguf.GGUFReader(tmp_path / "m.imatrix.gguf")
    assert reader.fields["general.type"].contents() == "imatrix"
    assert {tensor.name for tensor in reader.tensors} == {
        "blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts", "output.weight.in_sum2", "output.weight.counts"}


def test_imatrix_legacy_dat(tmp_path):
    """llama-imatrix's legacy layout, written byte by byte: values hold mean * ncall."""
    name = b"blk.0.ffn_down.weight"
    values = np.array([0.5, 1.5, 3.0], dtype="<f4") * 10
    data = (struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, 3) + values.tobytes()
            + struct.pack("<i", 10) + struct.pack("<i", 5) + b"x.txt")
    (tmp_path / "m.dat").write_bytes(data)
    loaded = ImportanceMatrix.load(tmp_path / "m.dat")
    assert np.allclose(loaded.vector("blk.0.ffn_down.weight"), [0.5, 1.5, 3.0])
    assert loaded.chunk_count == 10 and loaded.datasets == ["x.txt"]
    (tmp_path / "bad.dat").write_bytes(data[:20])
    with pytest.raises(InputError):
        ImportanceMatrix.load(tmp_path / "bad.dat")


def test_llama_quantize_reads_our_imatrix(calibration, tmp_path, tiny_gguf, llama_quantize):
    """llama-quantize loads our importance matrix and uses it: with it, Q4_0 differs from the plain quantization."""
    imatrix = calibration.imatrix.save(tmp_path / "ours.imatrix.gguf")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    subprocess.run([llama_quantize, tiny_gguf("F32"), plain, "Q4_0", "1"], check=True, capture_output=True)
    done = subprocess.run([llama_quantize, "--imatrix", imatrix, tiny_gguf("F32"), weighted, "Q4_0", "1"],
                          check=True, capture_output=True, text=True)
    assert f"loaded {len(calibration.imatrix.sums)} importance matrix entries" in done.stdout + done.stderr
    assert plain.read_bytes() != weighted.read_bytes()


def test_imatrix_conversion_matches_llama_quantize(calibration, tmp_path, tiny_llama, tiny_gguf, llama_quantize):
    """convert --imatrix writes the bytes llama-quantize writes with the same importance matrix (uniform Q4_0)."""
    imatrix = calibration.imatrix.save(tmp_path / "ours.imatrix.gguf")
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([llama_quantize, "--pure", "--imatrix", imatrix, tiny_gguf("F32"), theirs, "Q4_0", "1"],
                   check=True, capture_output=True)
    ours = convert(tiny_llama, tmp_path / "ours.gguf", "uniform", type="Q4_0", imatrix=imatrix, progress=False)
    theirs_tensors = {tensor.name: bytes(tensor.data) for tensor in gguf.GGUFReader(theirs).tensors}
    for tensor in gguf.GGUFReader(ours.path).tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            assert bytes(tensor.data) == theirs_tensors[tensor.name], tensor.name


def test_unit_importance_is_llama_quantizes_search_and_lowers_the_error(tiny_llama, tiny_gguf, tmp_path,
                                                                       llama_quantize):
    """--imatrix unit: the bytes llama-quantize writes given an all-ones imatrix, with less error than plain Q4_0."""
    model = open_checkpoint(tiny_llama)
    unit = load_importance("unit", model)
    assert unit.unit and set(unit.sums) == {spec.name for spec in model.specs if spec.is_matrix}
    ours = convert(tiny_llama, tmp_path / "unit.gguf", "uniform", type="Q4_0", imatrix="unit", progress=False)
    plain = convert(tiny_llama, tmp_path / "plain.gguf", "uniform", type="Q4_0", progress=False)
    ours_tensors = {t.name: t for t in gguf.GGUFReader(ours.path).tensors}
    plain_tensors = {t.name: t for t in gguf.GGUFReader(plain.path).tensors}
    errors = {"unit": 0.0, "plain": 0.0}
    for name, tensor in ours_tensors.items():
        if tensor.tensor_type != QType.Q4_0:
            continue
        source = model.load(model.by_name[name]).float().numpy()
        for label, tensors in (("unit", ours_tensors), ("plain", plain_tensors)):
            values = gguf.quants.dequantize(tensors[name].data, QType.Q4_0).reshape(source.shape)
            errors[label] += float(((values - source) ** 2).sum())
    assert errors["unit"] < 0.95 * errors["plain"], errors
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([llama_quantize, "--pure", "--imatrix", unit.save(tmp_path / "unit.imatrix.gguf"),
                    tiny_gguf("F32"), theirs, "Q4_0", "1"], check=True, capture_output=True)
    for tensor in gguf.GGUFReader(theirs).tensors:
        if tensor.tensor_type == QType.Q4_0:
            assert bytes(tensor.data) == bytes(ours_tensors[tensor.name].data), tensor.name
    with pytest.raises(InputError, match="needs the model"):
        load_importance("unit")


def test_optimal_plan_with_unit_importance_measures_its_own_errors(calibration, tiny_llama, tmp_path):
    options = dict(calibration=calibration, target_bpw=5.0, types="Q4_0,Q5_0,Q8_0,F16", dry_run=True,
                   progress=False)
    unit = convert(tiny_llama, tmp_path / "unit.gguf", "optimal", imatrix="unit", **options).plan
    plain = convert(tiny_llama, tmp_path / "plain.gguf", "optimal", **options).plan
    assert unit.params["imatrix"] == "unit" and plain.params["imatrix"] == "plain"
    # the searched encoders err less, so the same budget predicts a smaller KL divergence
    assert unit.params["predicted_kld"] < plain.params["predicted_kld"]


def test_optimal_plan_fits_the_file_size_and_records_predictions(calibration, tiny_llama, tmp_path):
    target = 1_100_000
    result = convert(tiny_llama, tmp_path / "optimal.gguf", "optimal", calibration=calibration, target_size=target,
                     types="Q4_0,Q4_K,Q6_K,Q8_0,F16", progress=False)
    assert result.bytes <= target
    assert result.path.stat().st_size == result.bytes
    weighted = [entry for entry in result.plan.entries if entry.predicted_kld is not None]
    assert len(weighted) == len(calibration.sensitivity)
    assert result.plan.params["predicted_kld"] == pytest.approx(sum(entry.predicted_kld for entry in weighted))
    # a larger budget never predicts worse
    larger = convert(tiny_llama, tmp_path / "larger.gguf", "optimal", calibration=calibration,
                     target_size=target * 1.3, types="Q4_0,Q4_K,Q6_K,Q8_0,F16", dry_run=True, progress=False)
    assert larger.plan.params["predicted_kld"] <= result.plan.params["predicted_kld"]
    # the calibration's sequences give the prediction an interval (bootstrap), around the prediction itself
    low, high = result.plan.params["predicted_kld_90"]
    assert 0 < low < result.plan.params["predicted_kld"] < high
    assert "90% over calibration sequences" in format_plan_summary(result.plan)


def test_bootstrap_interval_of_a_plan():
    from ewq_gguf.plan.optimal import bootstrap_interval

    # two weights, four sequences: per-sequence totals (t2-weighted sums) are 1, 2, 3 and 4
    samples = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([0.0, 0.0, 0.0, 0.0])}
    low, high = bootstrap_interval({"a": 1.0, "b": 5.0}, samples)
    assert 1.0 < low < 2.5 < high < 4.0
    assert bootstrap_interval({"a": 1.0}, {"a": np.full(8, 2.0)}) == [2.0, 2.0]


def test_optimal_needs_one_target_and_a_reachable_one(calibration, tiny_llama, tmp_path):
    model = open_checkpoint(tiny_llama)
    from ewq_gguf.api import make_plan

    with pytest.raises(InputError):
        make_plan(model, "optimal", calibration=calibration)
    with pytest.raises(InputError):
        make_plan(model, "optimal", calibration=calibration, target_size=1000, types="Q4_0,Q8_0")
    plan = make_plan(model, "optimal", calibration=calibration, target_bpw=5.0, types="Q4_0,Q4_K,Q6_K,Q8_0,F16")
    assert plan.bits_per_weight <= 5.0


def test_lim_plan_moves_the_least_changing_blocks_low(identity_block_model, text_file, tmp_path):
    result = calibrate(identity_block_model, text_file, tokens=128, ctx=64, sensitivity_tokens=64, error_types=(),
                       device="cpu", progress=False)
    converted = convert(identity_block_model, tmp_path / "lim.gguf", "lim", calibration=result, fraction=0.5,
                        types="Q4_0,Q8_0,F16", progress=False)
    types = {entry.name: entry.type.name for entry in converted.plan.entries}
    assert types["blk.1.attn_q.weight"] == "Q4_0"      # the identity block is least important
    assert types["blk.0.attn_q.weight"] == "Q8_0"


def test_calibration_of_another_model_is_refused(calibration, identity_block_model):
    model = open_checkpoint(identity_block_model)
    calibration.check_matches(model)      # same names and shapes: accepted
    broken = Calibration(**{**calibration.__dict__, "fingerprint": "0" * 16})
    with pytest.raises(InputError):
        broken.check_matches(model)


def test_importance_of_the_wrong_width_is_refused(tmp_path, tiny_llama):
    matrix = ImportanceMatrix()
    matrix.add("blk.0.attn_q.weight", np.ones(7), 1)
    path = matrix.save(tmp_path / "wrong.imatrix.gguf")
    with pytest.raises(InputError):
        load_importance(path, open_checkpoint(tiny_llama))


def test_cli_calibrate_then_convert(tiny_llama, text_file, tmp_path):
    from click.testing import CliRunner

    from ewq_gguf.cli import main

    runner = CliRunner()
    calib = tmp_path / "calib.json"
    done = runner.invoke(main, ["calibrate", str(tiny_llama), "--text", str(text_file), "--tokens", "128", "--ctx",
                                "64", "--sensitivity-tokens", "64", "--no-errors", "--device", "cpu", "--quiet",
                                "--out", str(calib)])
    assert done.exit_code == 0, done.output
    assert "LIM" in done.output and (tmp_path / "calib.imatrix.gguf").is_file()
    out = tmp_path / "optimal.gguf"
    done = runner.invoke(main, ["convert", str(tiny_llama), str(out), "--method", "optimal", "--calibration",
                                str(calib), "--target-bpw", "6", "--types", "Q4_0,Q8_0,F16", "--imatrix",
                                str(tmp_path / "calib.imatrix.gguf"), "--quiet"])
    assert done.exit_code == 0, done.output
    assert out.is_file()
    done = runner.invoke(main, ["convert", str(tiny_llama), str(tmp_path / "x.gguf"), "--method", "lim",
                                "--calibration", str(calib), "--target-bpw", "6"])
    assert done.exit_code == 2 and "--target-bpw: not used by --method lim" in done.output
