"""PLAN by EWQ, FastEWQ and ZD: tiers from hand-made scores, plans through JSON and GGUF metadata, metadata-only
planning that provably reads no tensor data, the shipped classifier, and the CLI options."""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from ewq_gguf.analyse import Analysis, BlockAnalysis, analyze
from ewq_gguf.api import convert, make_plan
from ewq_gguf.cli import main
from ewq_gguf.constants import KEY_EWQ_METHOD, KEY_EWQ_PLAN
from ewq_gguf.errors import InputError
from ewq_gguf.gguf_file.inspect import format_inspection, inspect_gguf
from ewq_gguf.plan import Plan
from ewq_gguf.plan.ewq import ewq_tiers, z_scores
from ewq_gguf.plan.fastewq import FEATURES, Classifier, block_features, train
from ewq_gguf.plan.plan import recipe_pattern
from ewq_gguf.plan.tiers import TierTypes
from ewq_gguf.plan.zd import least_important_first, zd_low_count
from ewq_gguf.quant import QType
from ewq_gguf.source.checkpoint import Checkpoint
from ewq_gguf.source.model import SourceModel, open_checkpoint


def cli(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# --- tiers ---------------------------------------------------------------------------------------------------------
def test_ewq_tiers_by_hand():
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]              # mu 3, sigma sqrt(2)
    assert ewq_tiers(scores, k=0.65) == ["LOW", "LOW", "HIGH", "HIGH", "HIGH"]    # mu - k sigma = 2.08
    assert ewq_tiers(scores, k=1.0) == ["LOW", "MID", "HIGH", "HIGH", "HIGH"]     # 1.59
    assert ewq_tiers(scores, k=2.2) == ["MID", "MID", "HIGH", "HIGH", "HIGH"]     # -0.11
    assert ewq_tiers(scores, k=0.65, direction="high-first") == ["HIGH", "HIGH", "HIGH", "LOW", "LOW"]
    assert ewq_tiers(scores, k=1.0, direction="high-first") == ["HIGH", "HIGH", "HIGH", "MID", "LOW"]
    assert ewq_tiers([7.0, 7.0, 7.0]) == ["HIGH"] * 3
    assert list(z_scores(scores)) == pytest.approx([-2 / np.sqrt(2), -1 / np.sqrt(2), 0, 1 / np.sqrt(2),
                                                    2 / np.sqrt(2)])
    with pytest.raises(InputError, match="direction"):
        ewq_tiers(scores, direction="sideways")


def test_zd_order_and_count():
    scores = np.array([0.15, 0.17, 0.14, 0.16])
    assert list(least_important_first(scores, "high-first")) == [1, 3, 0, 2]
    assert list(least_important_first(scores, "low-first")) == [2, 0, 3, 1]
    assert [zd_low_count(f, 30) for f in (0.0, 0.25, 0.5, 1.0)] == [0, 8, 15, 30]
    with pytest.raises(InputError, match="fraction"):
        zd_low_count(1.5, 4)


def test_tier_types_parse():
    assert TierTypes.parse("q4_k, Q8_0 ,f16").names() == ["Q4_K", "Q8_0", "F16"]
    with pytest.raises(InputError, match="three types"):
        TierTypes.parse("Q4_K,Q8_0")
    with pytest.raises(InputError, match="unsupported tensor type"):
        TierTypes.parse("Q4_K,Q9_X,F16")


# --- plans from hand-made analyses ---------------------------------------------------------------------------------
def made_analysis(model: SourceModel, **scores: list[float]) -> Analysis:
    """An Analysis of `model`'s shape with chosen per-block scores (others 0)."""
    real = analyze(model, device="cpu", progress=False)
    blocks = [replace(block, **{name: values[block.index] for name, values in scores.items()})
              for block in real.blocks]
    return replace(real, blocks=blocks)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama) -> SourceModel:
    return open_checkpoint(tiny_llama)


def block_types(plan: Plan) -> dict[int, set[str]]:
    types: dict[int, set[str]] = {}
    for entry in plan.entries:
        if entry.block is not None and len(entry.shape) >= 2:
            types.setdefault(entry.block, set()).add(entry.requested.name)
    return types


def test_ewq_plan_types_and_blocks(tiny_model):
    analysis = made_analysis(tiny_model, histogram=[5.0, 4.0])
    plan = make_plan(tiny_model, "ewq", analysis=analysis, entropy="histogram", types="Q4_0,Q5_0,Q8_0",
                     embed_type="Q6_K", output_type="F16")
    assert block_types(plan) == {0: {"Q8_0"}, 1: {"Q4_0"}}
    entries = plan.by_name()
    assert entries["token_embd.weight"].requested == QType.Q6_K
    assert entries["output.weight"].requested == QType.F16
    assert entries["blk.0.attn_norm.weight"].type == QType.F32
    assert [(b["block"], b["tier"], b["type"], b["score"]) for b in plan.blocks] == [
        (0, "HIGH", "Q8_0", 5.0), (1, "LOW", "Q4_0", 4.0)]
    assert plan.params["entropy"] == "histogram" and plan.params["mu"] == 4.5 and plan.params["sigma"] == 0.5
    mirrored = make_plan(tiny_model, "ewq", analysis=analysis, entropy="histogram", direction="high-first")
    assert block_types(mirrored) == {0: {"Q4_K"}, 1: {"F16"}}
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()


def test_zd_plan_both_directions(tiny_model):
    analysis = made_analysis(tiny_model, zd=[0.16, 0.15])
    high_first = make_plan(tiny_model, "zd", analysis=analysis, fraction=0.5)
    low_first = make_plan(tiny_model, "zd", analysis=analysis, fraction=0.5, direction="low-first")
    assert block_types(high_first) == {0: {"Q4_K"}, 1: {"Q8_0"}}
    assert block_types(low_first) == {0: {"Q8_0"}, 1: {"Q4_K"}}
    assert make_plan(tiny_model, "zd", analysis=analysis, fraction=0.0).blocks[0]["tier"] == "MID"
    with pytest.raises(InputError, match="--k, --entropy: not used by --method zd"):
        make_plan(tiny_model, "zd", analysis=analysis, k=1.0, entropy="softmax")
    with pytest.raises(InputError, match="--fraction: not used by --method ewq"):
        make_plan(tiny_model, "ewq", analysis=analysis, fraction=0.5)


def test_analysis_of_another_model_refused(tiny_model, tmp_path):
    analysis = made_analysis(tiny_model)
    other = replace(analysis, blocks=analysis.blocks[:1], n_blocks=1)
    with pytest.raises(InputError, match="does not match this model"):
        make_plan(tiny_model, "ewq", analysis=other)


def test_type_with_tiered_method_refused(tiny_model):
    with pytest.raises(InputError, match="--type applies to --method uniform"):
        make_plan(tiny_model, "ewq", type="Q8_0")
    assert make_plan(tiny_model, type="F16").method == "uniform"


# --- through the GGUF file ----------------------------------------------------------------------------------------
def test_ewq_convert_records_plan_in_gguf(tiny_llama, tmp_path):
    out = tmp_path / "ewq.gguf"
    result = convert(tiny_llama, out, "ewq", device="cpu", progress=False)
    reader = gguf.GGUFReader(out)
    recorded = json.loads(reader.fields[KEY_EWQ_PLAN].contents())
    assert recorded == json.loads(result.plan.to_json())
    assert reader.fields[KEY_EWQ_METHOD].contents() == "ewq"
    tiers = {block["block"]: block["tier"] for block in recorded["blocks"]}
    assert sorted(tiers.values()) == ["HIGH", "LOW"]       # two blocks: one above the mean, one below mu - k sigma
    written = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    expected = {"LOW": "Q4_K", "HIGH": "F16"}
    for block, tier in tiers.items():
        assert written[f"blk.{block}.ffn_down.weight"] == expected[tier]
    assert written["token_embd.weight"] == written["output.weight"] == "Q8_0"
    text = format_inspection(inspect_gguf(out))
    for block in recorded["blocks"]:
        assert f"{block['score']:.10g}" in text and block["why"] in text
    reused = convert(tiny_llama, tmp_path / "again.gguf", plan=out, dry_run=True, progress=False)
    assert {e.name: e.type.name for e in reused.plan.entries} == written


def test_dry_run_size_is_exact(tiny_llama, tmp_path):
    analysis = tmp_path / "analysis.json"
    analyze(tiny_llama, device="cpu", progress=False).save(analysis)
    for method in ("ewq", "zd"):
        out = tmp_path / f"{method}.gguf"
        planned = convert(tiny_llama, out, method, analysis=analysis, dry_run=True, progress=False)
        assert not out.exists()
        written = convert(tiny_llama, out, method, analysis=analysis, progress=False)
        assert planned.bytes == written.bytes == out.stat().st_size


# --- llama-quantize recipe -----------------------------------------------------------------------------------------

def recipe_types(recipe: str, names: list[str]) -> dict[str, str]:
    """The type llama-quantize gives each name: that of the first recipe line whose pattern is found in the name."""
    rules = [(re.compile(pattern), qtype) for pattern, _, qtype in (line.partition("=") for line in recipe.split())]
    return {name: next((qtype.upper() for rule, qtype in rules if rule.search(name)), "none") for name in names}


def test_recipe_names_each_tensor_exactly(tiny_model):
    plan = make_plan(tiny_model, "zd", analysis=made_analysis(tiny_model, zd=[0.16, 0.15]), fraction=0.5)
    recipe = plan.to_recipe()
    matrices = [entry for entry in plan.entries if len(entry.shape) >= 2]
    # the case an unanchored name gets wrong: output.weight is listed before an attn_output of another type
    order = [entry.name for entry in matrices]
    assert order.index("output.weight") < order.index("blk.0.attn_output.weight")
    assert plan.by_name()["output.weight"].type != plan.by_name()["blk.0.attn_output.weight"].type
    assert recipe_types(recipe, order) == {entry.name: entry.type.name for entry in matrices}
    assert len(recipe.split()) == len(matrices)          # 1-D tensors are not listed
    assert recipe_pattern("blk.0.attn_q.weight") == r"^blk\.0\.attn_q\.weight$"
    assert re.fullmatch(recipe_pattern("a+b(c)[d]{e}|f?g*h^i$j\\k"), "a+b(c)[d]{e}|f?g*h^i$j\\k")


def test_llama_quantize_applies_recipe(tiny_model, tiny_llama, tiny_gguf, tmp_path, llama_quantize):
    """llama-quantize --tensor-type-file with our recipe writes every tensor in our type, with our bytes."""
    recipe, theirs = tmp_path / "recipe.txt", tmp_path / "theirs.gguf"
    ours = convert(tiny_llama, tmp_path / "ours.gguf", "zd", analysis=made_analysis(tiny_model, zd=[0.16, 0.15]),
                   fraction=0.5, plan_out=recipe, progress=False)
    subprocess.run([llama_quantize, "--tensor-type-file", recipe, tiny_gguf("F32"), theirs, "Q8_0", "1"],
                   check=True, capture_output=True)
    theirs_tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(theirs).tensors}
    ours_tensors = gguf.GGUFReader(ours.path).tensors
    assert {tensor.name for tensor in ours_tensors} == set(theirs_tensors)
    assert len({tensor.tensor_type for tensor in ours_tensors}) >= 3
    for tensor in ours_tensors:
        other = theirs_tensors[tensor.name]
        assert other.tensor_type == tensor.tensor_type, tensor.name
        assert bytes(other.data) == bytes(tensor.data), tensor.name


# --- metadata only -------------------------------------------------------------------------------------------------
@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(Checkpoint, "load", refuse)
    monkeypatch.setattr(SourceModel, "load", refuse)


def test_fastewq_and_uniform_read_no_tensor_data(tiny_llama, tmp_path, no_tensor_reads):
    with pytest.raises(AssertionError, match="tensor data was read"):
        make_plan(open_checkpoint(tiny_llama), "ewq")        # the guard works
    plan = make_plan(open_checkpoint(tiny_llama), "fastewq")
    assert [block["tier"] in ("LOW", "MID", "HIGH") for block in plan.blocks] == [True, True]
    for method in ("fastewq", "uniform"):
        result = cli("convert", tiny_llama, tmp_path / "x.gguf", "--method", method, "--dry-run")
        assert result.exit_code == 0, result.output
        assert "dry run: would write" in result.stdout
    assert not (tmp_path / "x.gguf").exists()


def test_shipped_classifier():
    classifier = Classifier.load()
    assert [entry["model"] for entry in classifier.trained_on] == ["smollm2", "qwen25"]
    assert classifier.features == list(FEATURES)
    assert classifier.labels == {"entropy": "softmax", "k": 0.65, "direction": "low-first"}
    assert 0.0 <= classifier.evaluation["agreement"] <= 1.0
    assert len(classifier.predict([3_538_944] * 30)) == 30


def synthetic_analysis(name: str, n_blocks: int) -> Analysis:
    """Entropy falls over the last fifth of the depth: EWQ puts exactly those blocks LOW."""
    blocks = []
    for index in range(n_blocks):
        depth = index / n_blocks
        value = 10.0 - (2.0 if depth >= 0.8 else 0.0)
        blocks.append(BlockAnalysis(index, 1000 * n_blocks, value, value / 20, value, 0.15))
    return Analysis(name, "llama", n_blocks, blocks)


def test_fastewq_learns_a_depth_rule(tmp_path):
    analyses = [synthetic_analysis(f"m{n}", n) for n in (20, 25, 30, 40)]
    classifier = train(analyses)
    assert classifier.evaluation["agreement"] >= 0.9
    held_out = synthetic_analysis("m35", 35)
    expected = ewq_tiers(held_out.scores("softmax"))
    predicted = classifier.predict(held_out.block_params)
    assert np.mean([a == b for a, b in zip(predicted, expected)]) >= 0.9
    path = tmp_path / "classifier.json"
    classifier.save(path)
    assert Classifier.load(path).predict(held_out.block_params) == predicted
    assert block_features([5, 5])[1].tolist() == [1.0, 0.5, 2.0, 5.0]


def test_fastewq_settings_must_match_classifier(tiny_model):
    with pytest.raises(InputError, match="train one for these settings"):
        make_plan(tiny_model, "fastewq", entropy="histogram")


def test_cli_fastewq_train_and_use(tiny_llama, tmp_path):
    paths = []
    for n in (20, 30):
        path = tmp_path / f"m{n}.json"
        path.write_text(synthetic_analysis(f"m{n}", n).to_json())
        paths.append(path)
    out = tmp_path / "classifier.json"
    result = cli("fastewq", "train", *paths, "--out", out)
    assert result.exit_code == 0, result.output
    assert "held out m20" in result.stdout and "leave-one-model-out agreement" in result.stdout
    plan_out = tmp_path / "plan.json"
    result = cli("convert", tiny_llama, tmp_path / "x.gguf", "--method", "fastewq", "--classifier", out,
                 "--dry-run", "--plan-out", plan_out, "--types", "Q4_0,Q5_0,Q8_0")
    assert result.exit_code == 0, result.output
    plan = Plan.from_json(plan_out.read_text())
    assert plan.method == "fastewq" and plan.params["trained_on"] == ["m20", "m30"]
    assert plan.params["types"] == ["Q4_0", "Q5_0", "Q8_0"]


def test_cli_convert_options_errors(tiny_llama, tmp_path):
    result = cli("convert", tiny_llama, tmp_path / "x.gguf", "--method", "ewq", "--type", "Q8_0")
    assert result.exit_code == 2 and "--type applies to --method uniform" in result.stderr
    result = cli("convert", tiny_llama, tmp_path / "x.gguf", "--method", "zd", "--fraction", "2", "--dry-run")
    assert result.exit_code == 2 and "--fraction must lie in [0, 1]" in result.stderr
    result = cli("convert", tiny_llama, tmp_path / "x.gguf", "--analysis", tmp_path / "missing.json")
    assert result.exit_code == 2 and "analysis file not found" in result.stderr
