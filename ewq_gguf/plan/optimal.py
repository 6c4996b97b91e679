"""Optimal per-tensor types for a size budget (the linearity theorem of Malinovskii et al., "Pushing the Limits of
Large Language Model Quantization via the Linearity Theorem", 2024).

The KL increase of a mixed-precision file is predicted as sum over weights of alpha_w * t2_w(type_w): alpha from the
calibration (gradients or noise injection), t2 the measured relative error of the weight in that type. Among every assignment of
one candidate type per weight whose file fits the budget, the planner returns one of least predicted KL: a
multiple-choice knapsack solved exactly by dynamic programming over the byte budget in units of `unit` bytes.
Sizes are rounded up to whole units and the budget down, so the plan never exceeds it; the optimum is exact for
unit = 1 and at most one unit per weight from the exact optimum otherwise (the DP uses about 200,000 units).

Which error metric: "weighted" weighs each element of the error as the calibration does (Calibration.error_weights:
from gradients, by the outer product of the Fisher information's row and column sums, which predicts a quantization
error's KL as the Fisher's whole diagonal does; from noise injection, by the input columns' mean squared activation);
"plain" is the plain relative error ||W_hat - W||_F^2 / ||W||_F^2.

File size: a GGUF file is its header (metadata, the tokenizer, the plan itself as ewq.plan, the tensor table) padded
to the data alignment, then each tensor padded to it. The DP counts padded tensor sizes; the header depends on the
plan, so the budget is re-solved with the measured header until the whole file fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from gguf import GGMLQuantizationType as QType

from ..calibrate import Calibration
from ..errors import InputError
from ..gguf_file.header import padded
from ..calibrate.imatrix import ImportanceMatrix
from ..quant import effective_type, planner_types, tensor_nbytes
from ..source.model import SourceModel, TensorSpec
from ..write import parse_size
from .entries import entry_for
from .inputs import calibration_for, calibration_option
from .plan import Plan
from .registry import PlanContext, option, register_planner

DEFAULT_RESOLUTION = 200_000
# each metric's column in the error tables, [t2, t2_weighted] (quant_error.error_tables)
METRIC_COLUMNS = {"plain": 0, "weighted": 1}
METRICS = tuple(METRIC_COLUMNS)
DEFAULT_METRIC = "weighted"


@dataclass(frozen=True)
class Choice:
    qtype: QType
    nbytes: int          # bytes as stored in the file, alignment padding included
    t2: float
    predicted_kld: float


def choose(sizes: Sequence[Sequence[int]], costs: Sequence[Sequence[float]], budget: int,
           resolution: int = DEFAULT_RESOLUTION) -> tuple[list[int], float]:
    """One choice per item minimising the summed cost with summed size <= budget: (choice indices, total cost).

    Dynamic programming over the budget above the smallest possible total, in units of
    ceil(spare / resolution) bytes (1 byte when the spare budget is at most `resolution`). InputError when even
    the smallest choices do not fit.
    """
    n_items = len(sizes)
    sizes_arr = [np.asarray(item, dtype=np.int64) for item in sizes]
    costs_arr = [np.asarray(item, dtype=np.float64) for item in costs]
    floor_total = int(sum(int(item.min()) for item in sizes_arr))
    spare = budget - floor_total
    if spare < 0:
        raise InputError(f"the budget of {budget:,} bytes is below the smallest possible size, {floor_total:,} bytes")
    unit = max(1, -(-spare // resolution))
    capacity = spare // unit
    best = np.zeros(capacity + 1)          # least cost of the items so far within k units of extra size
    picks = np.zeros((n_items, capacity + 1), dtype=np.int16)
    for index in range(n_items):
        extra = -(-(sizes_arr[index] - sizes_arr[index].min()) // unit)      # rounded up: never over budget
        updated = np.full(capacity + 1, np.inf)
        for choice in _undominated(extra, costs_arr[index]):
            weight = int(extra[choice])
            if weight > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[weight:] = best[:capacity + 1 - weight] + costs_arr[index][choice]
            better = candidate < updated
            updated[better] = candidate[better]
            picks[index][better] = choice
        best = updated
    chosen = [0] * n_items
    remaining = capacity
    for index in range(n_items - 1, -1, -1):
        choice = int(picks[index][remaining])
        chosen[index] = choice
        remaining -= int(-(-(sizes_arr[index][choice] - sizes_arr[index].min()) // unit))
    return chosen, float(best[capacity])


def _undominated(extra: np.ndarray, costs: np.ndarray) -> list[int]:
    """Choices not beaten by another that is no larger and no worse (ties keep the first), cheapest first."""
    order = sorted(range(len(extra)), key=lambda choice: (extra[choice], costs[choice], choice))
    kept, best_cost = [], np.inf
    for choice in order:
        if costs[choice] < best_cost:
            kept.append(choice)
            best_cost = costs[choice]
    return kept


def parse_candidates(text: Optional[str]) -> Optional[list[QType]]:
    """The types named in text (--types); None without text: then each weight has its default menu."""
    if not text:
        return None
    from .tiers import type_named

    return [type_named(name) for name in text.split(",") if name.strip()]


def weight_candidates(candidates: Optional[Sequence[QType]], spec: TensorSpec) -> Sequence[QType]:
    """The candidates asked for, or by default quant.planner_types of the weight's shape: every type we encode,
    MXFP4 for expert tensors only. Those the rows cannot hold are replaced per weight (stored_types)."""
    return planner_types(spec.shape) if candidates is None else candidates


def stored_types(candidates: Sequence[QType], n_per_row: int) -> dict[QType, QType]:
    """Type actually stored -> the candidate asked for, for rows of n_per_row: a candidate the rows cannot hold is
    stored as llama.cpp's fallback for it (so a k-quant-only candidate set still plans 576-wide rows), and two
    candidates stored alike are one choice. Candidates llama.cpp has no fallback for are left out."""
    stored: dict[QType, QType] = {}
    for qtype in candidates:
        try:
            effective = effective_type(qtype, n_per_row)
        except ValueError:
            continue
        if effective == qtype or effective not in stored:
            stored[effective] = qtype
    return stored


def candidate_choices(model: SourceModel, alphas: dict[str, float], errors: dict[str, dict[str, list[float]]],
                      candidates: Optional[Sequence[QType]], metric: str) -> dict[str, list[Choice]]:
    """Per optimised weight, its choices: the types its candidates are stored as (see stored_types) whose error
    was measured. InputError when a choice's predicted KL (the DP's cost) is not finite: the DP would silently drop
    a NaN choice and could return a plan over the budget."""
    column = METRIC_COLUMNS[metric]
    choices = {}
    for spec in model.specs:
        if not spec.is_matrix or spec.name not in alphas:
            continue
        measured = errors.get(spec.name, {})
        menu = weight_candidates(candidates, spec)
        options = []
        for effective, qtype in stored_types(menu, spec.shape[-1]).items():
            if effective.name in measured:
                t2 = measured[effective.name][column]
                cost = alphas[spec.name] * t2
                if not math.isfinite(cost):
                    raise InputError(f"cannot plan '{spec.name}': its predicted KL increase in {effective.name} is "
                                     f"{cost} (sensitivity {alphas[spec.name]} x relative error {t2}); the optimal "
                                     "planner needs finite values")
                options.append(Choice(qtype, padded(tensor_nbytes(effective, spec.shape)), t2, cost))
        if not options:
            raise InputError(f"none of the candidate types ({', '.join(t.name for t in menu)}) can hold "
                             f"'{spec.name}' (rows of {spec.shape[-1]})")
        choices[spec.name] = options
    return choices


def optimal_plan(model: SourceModel, choices: dict[str, list[Choice]], file_budget: int,
                 file_size: Callable[[Plan], int], params: dict, resolution: int = DEFAULT_RESOLUTION,
                 samples: Optional[dict[str, np.ndarray]] = None) -> Plan:
    """The least-predicted-KL plan whose whole file (as `file_size` measures a plan) is at most file_budget bytes.

    Weights without choices (1-D tensors, weights the calibration did not measure) keep their fixed types.
    samples: per weight, its sensitivity estimated from each calibration sequence alone; the plan then records a
    90% bootstrap interval of its predicted KL (predicted_kld_90)."""
    names = list(choices)
    fixed_bytes = sum(padded(entry_for(spec, QType.F32, "").nbytes) for spec in model.specs
                      if spec.name not in choices)
    header = 0
    for _ in range(8):
        budget = file_budget - padded(header) - fixed_bytes
        if budget < 0:
            raise InputError(f"a file of {file_budget:,} bytes cannot hold this model's fixed tensors and header")
        picks, _ = choose([[choice.nbytes for choice in choices[name]] for name in names],
                          [[choice.predicted_kld for choice in choices[name]] for name in names], budget, resolution)
        plan = _plan_from_picks(model, choices, dict(zip(names, picks)), params, samples)
        size = file_size(plan)
        if size <= file_budget:
            return plan
        # the header this plan measured (the DP may leave slack below the budget, so the overflow alone can
        # underestimate it), or more where a smaller plan's header still did not fit
        measured = size - fixed_bytes - sum(padded(entry.nbytes) for entry in plan.entries if entry.name in choices)
        header = max(measured, header + size - file_budget)
    raise InputError(f"could not fit a plan into {file_budget:,} bytes")


def _plan_from_picks(model: SourceModel, choices: dict[str, list[Choice]], picks: dict[str, int],
                     params: dict, samples: Optional[dict[str, np.ndarray]] = None) -> Plan:
    entries = []
    total = 0.0
    if samples:
        params = {**params, "predicted_kld_90": bootstrap_interval(
            {name: choices[name][pick].t2 for name, pick in picks.items()}, samples)}
    for spec in model.specs:
        if spec.name in choices:
            choice = choices[spec.name][picks[spec.name]]
            entry = replace(entry_for(spec, choice.qtype, f"alpha x t2 = {choice.predicted_kld:.3g}"),
                            predicted_kld=choice.predicted_kld)
            total += choice.predicted_kld
        else:
            entry = entry_for(spec, QType.F32, "not measured: F32")
        entries.append(entry)
    return Plan("optimal", {**params, "predicted_kld": total}, entries)



def bootstrap_interval(t2: dict[str, float], samples: dict[str, np.ndarray], draws: int = 1000,
                       seed: int = 0) -> list[float]:
    """5th and 95th percentiles of sum_w alpha_w t2_w when the calibration sequences are drawn again with
    replacement (the same draw for every weight: one sequence informs all of them). Only gradient calibrations
    have per-sequence samples; noise injection measures one alpha per weight, and its plans record no interval."""
    names = [name for name in t2 if name in samples]
    matrix = np.stack([np.asarray(samples[name], dtype=np.float64) for name in names])   # weights x sequences
    n_sequences = matrix.shape[1]
    picks = np.random.default_rng(seed).integers(0, n_sequences, size=(draws, n_sequences))
    weights = np.array([t2[name] for name in names])
    totals = (weights @ matrix)[picks].mean(axis=1)
    low, high = np.percentile(totals, [5, 95])
    return [float(low), float(high)]


def plan_for_target(model: SourceModel, calibration: Calibration, file_size: Callable[[Plan], int], *,
                    target_size: Optional[int] = None, target_bpw: Optional[float] = None,
                    types: Optional[str] = None, metric: str = DEFAULT_METRIC,
                    importance: Optional[ImportanceMatrix] = None,
                    progress: bool = True,
                    resolution: int = DEFAULT_RESOLUTION) -> Plan:
    """The optimal plan of `model` for a whole-file size (`target_size` bytes, measured by `file_size`) or for
    `target_bpw` bits per weight of tensor data, from `calibration`.

    importance: the ImportanceMatrix the file will be quantized with (None: plain quantization). Errors come from
    the calibration's tables when it holds them for this case, else they are measured now.
    """
    from ..calibrate.quant_error import DEFAULT_SAMPLE, error_tables

    calibration.check_matches(model)
    if (target_size is None) == (target_bpw is None):
        raise InputError("--method optimal needs exactly one of --target-size and --target-bpw")
    if metric not in METRICS:
        raise InputError(f"unknown error metric '{metric}' (choose from {', '.join(METRICS)})")
    candidates = parse_candidates(types)
    weighted = metric == "weighted"
    alphas = {name: calibration.alpha(name, weighted) for name in calibration.sensitivity}
    specs = [spec for spec in model.specs if spec.is_matrix and spec.name in alphas]
    variant = _cached_variant(calibration, importance)
    cached = calibration.errors.get(variant, {}) if variant else {}
    stored = {spec.name: stored_types(weight_candidates(candidates, spec), spec.shape[-1]) for spec in specs}
    if all(all(qtype.name in cached.get(spec.name, {}) for qtype in stored[spec.name]) for spec in specs):
        errors = cached
    else:
        quant_vectors = importance.vectors() if importance is not None else {}
        measured_types = list(dict.fromkeys(qtype for spec in specs for qtype in stored[spec.name]))
        errors = error_tables(model, specs, measured_types, {"measured": quant_vectors.get},
                              calibration.error_weights, sample=calibration.error_sample or DEFAULT_SAMPLE,
                              progress=progress)["measured"]
    choices = candidate_choices(model, alphas, errors, candidates, metric)
    asked = dict.fromkeys(qtype.name for spec in specs for qtype in weight_candidates(candidates, spec))
    params = {"metric": metric, "types": list(asked),
              "imatrix": variant or "other", "calibration_text": calibration.text,
              "calibration_tokens": calibration.tokens, "sensitivity_tokens": calibration.sensitivity_tokens}
    samples = {name: np.asarray(measured.samples_weighted if weighted else measured.samples)
               for name, measured in calibration.sensitivity.items() if measured.samples}
    if target_size is not None:
        params["target_size"] = int(target_size)
        return optimal_plan(model, choices, int(target_size), file_size, params, resolution, samples)
    if target_bpw <= 0:
        raise InputError(f"--target-bpw must be positive, got {target_bpw}")
    params["target_bpw"] = float(target_bpw)
    n_params = sum(spec.numel for spec in model.specs)
    return optimal_plan(model, choices, int(target_bpw * n_params / 8), lambda plan: plan.tensor_bytes, params,
                        resolution, samples)


def _cached_variant(calibration: Calibration, importance: Optional[ImportanceMatrix]) -> Optional[str]:
    """Which of the calibration's error tables describes quantization with `importance`: "plain" without one,
    "imatrix" with the calibration's own, "unit" for the unit matrix (measured when needed), None for another
    importance matrix."""
    if importance is None:
        return "plain"
    if importance.unit:
        return "unit"
    own = calibration.imatrix
    same = own.sums.keys() == importance.sums.keys() and all(
        np.array_equal(own.vector(name), importance.vector(name)) for name in own.sums)
    return "imatrix" if same else None


def predicted_kld(plan: Plan, calibration: Calibration, variant: str = "plain", metric: str = DEFAULT_METRIC) -> Optional[float]:
    """The linearity theorem's prediction for any plan: sum of alpha x t2 over its weights, from the calibration's
    error table `variant` ("plain" or "imatrix"); None when the table lacks one of the plan's (weight, type)."""
    column = METRIC_COLUMNS[metric]
    table = calibration.errors.get(variant, {})
    total = 0.0
    for entry in plan.entries:
        alpha = calibration.alpha(entry.name, metric == "weighted")
        if alpha is None:
            continue
        measured = table.get(entry.name, {}).get(entry.type.name)
        if measured is None:
            return None
        total += alpha * measured[column]
    return total


@dataclass(frozen=True)
class OptimalOptions:
    types: Optional[str] = option(None, "Candidate types, comma-separated.",
                                  default_text="every type ewq-gguf encodes")
    calibration: Optional[Calibration | str | Path] = calibration_option()
    target_size: Optional[int | str] = option(None, "The whole output file at most this size, e.g. 100MB (K/M/G, "
                                                    "decimal).")
    target_bpw: Optional[float] = option(None, "At most this many bits per weight of tensor data.", value_type=float)
    metric: str = option(DEFAULT_METRIC, "Relative error with input columns weighted by their activations, or plain.",
                         choices=METRICS)


@register_planner("optimal", OptimalOptions, help="least predicted KL divergence for a file size (--target-size or "
                                                  "--target-bpw), from a calibration")
def make(model: SourceModel, options: OptimalOptions, context: PlanContext) -> Plan:
    return plan_for_target(
        model, calibration_for(options.calibration, "optimal"), context.file_size,
        target_size=parse_size(options.target_size) if options.target_size is not None else None,
        target_bpw=options.target_bpw, types=options.types, metric=options.metric, importance=context.importance,
        progress=context.progress)
