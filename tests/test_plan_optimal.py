"""The optimal planner's knapsack: exact on small instances, never over budget, and whole plans that fit a file size."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from ewq_gguf.errors import InputError
from ewq_gguf.plan.optimal import candidate_choices, choose, parse_candidates, stored_types
from ewq_gguf.quant import QType, planner_types
from ewq_gguf.source.model import TensorSpec, open_checkpoint


def brute_force(sizes, costs, budget):
    best = None
    for picks in itertools.product(*[range(len(item)) for item in sizes]):
        size = sum(item[pick] for item, pick in zip(sizes, picks))
        if size <= budget:
            cost = sum(item[pick] for item, pick in zip(costs, picks))
            if best is None or cost < best:
                best = cost
    return best


def random_instance(rng, n_items, n_choices, max_size):
    sizes = [list(rng.integers(1, max_size, size=n_choices)) for _ in range(n_items)]
    costs = [list(rng.random(n_choices)) for _ in range(n_items)]
    return sizes, costs


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    sizes, costs = random_instance(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), 30)
    smallest = sum(min(item) for item in sizes)
    budget = int(rng.integers(smallest, sum(max(item) for item in sizes) + 2))
    picks, total = choose(sizes, costs, budget)
    assert sum(item[pick] for item, pick in zip(sizes, picks)) <= budget
    assert total == pytest.approx(sum(item[pick] for item, pick in zip(costs, picks)))
    assert total == pytest.approx(brute_force(sizes, costs, budget))


@pytest.mark.parametrize("seed", range(20))
def test_coarse_units_never_exceed_the_budget(seed):
    """With sizes far above the resolution, the DP works in units of many bytes: still never over budget, and no
    worse than the brute-force optimum of a budget smaller by one unit per item."""
    rng = np.random.default_rng(100 + seed)
    sizes, costs = random_instance(rng, 5, 4, 10**7)
    smallest = sum(min(item) for item in sizes)
    budget = int(rng.integers(smallest, sum(max(item) for item in sizes)))
    resolution = 50
    picks, total = choose(sizes, costs, budget, resolution=resolution)
    assert sum(item[pick] for item, pick in zip(sizes, picks)) <= budget
    unit = -(-(budget - smallest) // resolution)
    reference = brute_force(sizes, costs, budget - len(sizes) * unit)
    if reference is not None:
        assert total <= reference + 1e-12


def test_budget_below_the_smallest_choices_is_an_error():
    with pytest.raises(InputError):
        choose([[10, 20], [5]], [[1.0, 0.0], [0.0]], 14)


def test_dominated_choices_are_never_picked():
    # the second choice is larger and worse than the first
    picks, total = choose([[10, 12, 30]], [[0.5, 0.9, 0.1]], 20)
    assert picks == [0] and total == 0.5


def test_candidates_a_row_cannot_hold_are_planned_as_llama_cpps_fallback():
    k_quants = parse_candidates("Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,F16")
    # rows of 576: every k-quant is stored as its fallback; two candidates stored alike are one choice, and a
    # candidate stored as itself names it
    assert {stored.name: asked.name for stored, asked in stored_types(k_quants, 576).items()} == {
        "Q4_0": "Q2_K", "Q5_0": "Q4_K", "Q5_1": "Q5_K", "Q8_0": "Q8_0", "F16": "F16"}
    # rows of 512 hold every k-quant
    assert all(stored == asked for stored, asked in stored_types(k_quants, 512).items())
    assert len(stored_types(k_quants, 512)) == len(k_quants)


@pytest.mark.parametrize("alpha, t2", [(1.0, float("nan")), (float("nan"), 0.01), (1.0, float("inf"))])
def test_a_cost_that_is_not_a_number_is_refused(tiny_llama, alpha, t2):
    """A NaN cost would silently drop its choice from the DP (NaN compares false), which could leave a plan over
    the budget with a predicted KL of NaN: refused, naming the weight and the type."""
    model = open_checkpoint(tiny_llama)
    matrices = [spec.name for spec in model.specs if spec.is_matrix]
    alphas = dict.fromkeys(matrices, 1.0)
    errors = {name: {"Q8_0": [0.001, 0.001], "Q4_K": [0.01, 0.01]} for name in matrices}
    alphas["blk.1.ffn_down.weight"] = alpha
    errors["blk.1.ffn_down.weight"]["Q4_K"] = [t2, t2]
    with pytest.raises(InputError, match=r"cannot plan 'blk\.1\.ffn_down\.weight': its predicted KL increase in "
                                         r"(Q4_K|Q8_0) is (nan|inf)"):
        candidate_choices(model, alphas, errors, parse_candidates("Q4_K,Q8_0"), "weighted")


def test_mxfp4_is_a_default_candidate_of_expert_tensors_only():
    """llama-quantize's MXFP4_MOE mix stores tensors with ne[2] > 1 (stacked experts) in MXFP4 and the rest in Q8_0:
    the default menu follows it, while --types may name MXFP4 for any weight (as llama-quantize --pure does)."""
    experts = TensorSpec("blk.0.ffn_up_exps.weight", (8, 512, 256), "computed", "BF16")
    dense = TensorSpec("blk.0.ffn_up.weight", (512, 256), "computed", "BF16")
    one_expert = TensorSpec("blk.0.ffn_up_exps.weight", (1, 512, 256), "computed", "BF16")
    assert [QType.MXFP4 in planner_types(spec.shape) for spec in (experts, dense, one_expert)] == [True, False, False]
    model = SimpleNamespace(specs=[experts, dense])
    alphas = dict.fromkeys([experts.name, dense.name], 1.0)
    errors = dict.fromkeys(alphas, {"Q8_0": [0.001, 0.001], "MXFP4": [0.01, 0.01]})

    def offered(candidates):
        choices = candidate_choices(model, alphas, errors, candidates, "weighted")
        return {name: {choice.qtype.name for choice in options} for name, options in choices.items()}

    assert offered(parse_candidates(None)) == {experts.name: {"Q8_0", "MXFP4"}, dense.name: {"Q8_0"}}
    assert offered(parse_candidates("MXFP4,Q8_0")) == dict.fromkeys(alphas, {"Q8_0", "MXFP4"})


@pytest.mark.parametrize("metric, column", [("plain", 0), ("weighted", 1)])
def test_each_metric_prices_its_own_error(tiny_llama, metric, column):
    """Error tables hold [t2, t2_weighted]: the weighted metric prices t2_weighted (it once priced t2)."""
    model = open_checkpoint(tiny_llama)
    matrices = [spec.name for spec in model.specs if spec.is_matrix]
    errors = {name: {"Q8_0": [0.001, 0.002], "Q4_K": [0.01, 0.03]} for name in matrices}
    choices = candidate_choices(model, dict.fromkeys(matrices, 2.0), errors, parse_candidates("Q4_K,Q8_0"), metric)
    for name in matrices:
        assert {choice.qtype.name: choice.predicted_kld for choice in choices[name]} == {
            qtype: pytest.approx(2.0 * measured[column]) for qtype, measured in errors[name].items()}
