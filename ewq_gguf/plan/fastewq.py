"""FastEWQ: predict EWQ's tier of each block from metadata alone, without reading any weight.

Features (config.json and safetensors headers only): the block's execution index, the index as a fraction of depth,
the number of blocks, and the block's 2-D weight parameter count. The classifier is a small random forest (the
FastEWQ paper's choice) of CART trees with Gini splits, trained on EWQ tiers from full analyses; inference is
numpy only. Training is deterministic (fixed seed). A trained default ships as package data together with the list
of models it was trained on and its leave-one-model-out agreement with full EWQ.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..analyse import ENTROPY_STATISTICS, Analysis
from ..analyse.analysis import block_matrix_params
from ..errors import InputError
from ..source.model import SourceModel
from .ewq import DEFAULT_DIRECTION, DEFAULT_ENTROPY, DEFAULT_K, check_entropy, ewq_tiers
from .plan import Plan
from .registry import PlanContext, option, register_planner
from .tiers import DIRECTIONS, TIERS, TierOptions, TierTypes, check_direction, tiered_plan

CLASSIFIER_FORMAT = 1
FEATURES = ("index", "depth_fraction", "n_blocks", "block_params")
DEFAULT_CLASSIFIER = "fastewq_default.json"
N_TREES = 25
MAX_DEPTH = 3
MIN_LEAF = 2
SEED = 0


def block_features(block_params: Sequence[int]) -> np.ndarray:
    """One row per block: FEATURES, from the blocks' parameter counts in execution order."""
    n_blocks = len(block_params)
    index = np.arange(n_blocks, dtype=np.float64)
    return np.column_stack([index, index / n_blocks, np.full(n_blocks, float(n_blocks)),
                            np.asarray(block_params, dtype=np.float64)])


# --- trees -------------------------------------------------------------------------------------------------------
def _gini(counts: np.ndarray) -> float:
    total = counts.sum()
    return 0.0 if total == 0 else 1.0 - float(((counts / total) ** 2).sum())


def _grow(features: np.ndarray, labels: np.ndarray, rng: np.random.Generator, depth: int,
          nodes: list[dict[str, Any]]) -> int:
    """Append the subtree for these samples to `nodes` (CART, Gini); returns its root's position."""
    counts = np.bincount(labels, minlength=len(TIERS)).astype(np.float64)
    position = len(nodes)
    nodes.append({"feature": -1, "threshold": 0.0, "left": -1, "right": -1,
                  "value": (counts / counts.sum()).tolist()})
    if depth >= MAX_DEPTH or len(labels) < 2 * MIN_LEAF or _gini(counts) == 0.0:
        return position
    n_features = features.shape[1]
    candidates = rng.choice(n_features, size=max(1, int(np.sqrt(n_features))), replace=False)
    best: Optional[tuple[float, int, float]] = None
    for feature in sorted(candidates):
        values = np.unique(features[:, feature])
        for threshold in (values[:-1] + values[1:]) / 2:
            left = features[:, feature] <= threshold
            if min(left.sum(), (~left).sum()) < MIN_LEAF:
                continue
            impurity = sum(mask.sum() * _gini(np.bincount(labels[mask], minlength=len(TIERS)).astype(np.float64))
                           for mask in (left, ~left)) / len(labels)
            if best is None or impurity < best[0] - 1e-12:
                best = (impurity, int(feature), float(threshold))
    if best is None or best[0] >= _gini(counts) - 1e-12:
        return position
    _, feature, threshold = best
    left = features[:, feature] <= threshold
    nodes[position].update(feature=feature, threshold=threshold)
    nodes[position]["left"] = _grow(features[left], labels[left], rng, depth + 1, nodes)
    nodes[position]["right"] = _grow(features[~left], labels[~left], rng, depth + 1, nodes)
    return position


def _tree_probabilities(nodes: list[dict[str, Any]], row: np.ndarray) -> np.ndarray:
    node = nodes[0]
    while node["feature"] >= 0:
        node = nodes[node["left"] if row[node["feature"]] <= node["threshold"] else node["right"]]
    return np.asarray(node["value"], dtype=np.float64)


# --- the classifier ----------------------------------------------------------------------------------------------
@dataclass
class Classifier:
    """A random forest predicting a block's EWQ tier; `labels` says which EWQ settings produced its training tiers."""

    trees: list[list[dict[str, Any]]]
    labels: dict[str, Any]
    trained_on: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    features: list[str] = field(default_factory=lambda: list(FEATURES))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(blocks, 3) mean class probabilities over the trees, columns LOW, MID, HIGH."""
        return np.array([np.mean([_tree_probabilities(tree, row) for tree in self.trees], axis=0)
                         for row in features])

    def predict(self, block_params: Sequence[int]) -> list[str]:
        return [TIERS[int(np.argmax(row))] for row in self.probabilities(block_features(block_params))]

    # --- serialisation -------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": CLASSIFIER_FORMAT, **asdict(self)}, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str, origin: str = "classifier") -> "Classifier":
        try:
            data = json.loads(text)
            if data.get("format") != CLASSIFIER_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {CLASSIFIER_FORMAT}")
            if data.get("features") != list(FEATURES):
                raise ValueError(f"features {data.get('features')!r}, expected {list(FEATURES)}")
            classifier = cls(data["trees"], data["labels"], data.get("trained_on", []), data.get("evaluation", {}))
            if not classifier.trees:
                raise ValueError("no trees")
            return classifier
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{origin}: not a valid FastEWQ classifier ({exc})") from exc

    @classmethod
    def load(cls, path: Optional[str | Path] = None) -> "Classifier":
        """A classifier file, or the default one shipped with the package."""
        if path is None:
            text = resources.files("ewq_gguf").joinpath("data", DEFAULT_CLASSIFIER).read_text()
            return cls.from_json(text, DEFAULT_CLASSIFIER)
        path = Path(path)
        if not path.is_file():
            raise InputError(f"classifier file not found: {path}")
        return cls.from_json(path.read_text(), str(path))


def _labelled(analyses: Sequence[Analysis], entropy: str, k: float,
              direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, tier labels (0..2) and the model number of every block of every analysis."""
    features, labels, groups = [], [], []
    for number, analysis in enumerate(analyses):
        tiers = ewq_tiers(analysis.scores(entropy), k, direction)
        features.append(block_features(analysis.block_params))
        labels.extend(TIERS.index(tier) for tier in tiers)
        groups.extend([number] * analysis.n_blocks)
    return np.vstack(features), np.asarray(labels), np.asarray(groups)


def _forest(features: np.ndarray, labels: np.ndarray, seed: int) -> list[list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    trees = []
    for _ in range(N_TREES):
        sample = rng.integers(0, len(labels), size=len(labels))   # bootstrap
        nodes: list[dict[str, Any]] = []
        _grow(features[sample], labels[sample], rng, 0, nodes)
        trees.append(nodes)
    return trees


def train(analyses: Sequence[Analysis], *, entropy: str = DEFAULT_ENTROPY, k: float = DEFAULT_K,
          direction: str = DEFAULT_DIRECTION, seed: int = SEED) -> Classifier:
    """Train on the EWQ tiers of `analyses` and measure leave-one-model-out agreement with full EWQ."""
    if not analyses:
        raise InputError("fastewq train needs at least one analysis JSON")
    check_entropy(entropy)
    check_direction(direction)
    features, labels, groups = _labelled(analyses, entropy, k, direction)
    labels_info = {"entropy": entropy, "k": k, "direction": direction}
    classifier = Classifier(_forest(features, labels, seed), labels_info,
                            [{"model": a.model, "architecture": a.architecture, "n_blocks": a.n_blocks}
                             for a in analyses])
    classifier.evaluation = leave_one_model_out(features, labels, groups, analyses, seed)
    return classifier


def leave_one_model_out(features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                        analyses: Sequence[Analysis], seed: int = SEED) -> dict[str, Any]:
    """For each model: agreement with its full-EWQ tiers of a forest trained on the other models, next to the
    agreement of always answering the other models' most common tier (the baseline a classifier must beat)."""
    per_model = []
    for number, analysis in enumerate(analyses):
        held_out = groups == number
        if held_out.all():
            continue
        forest = Classifier(_forest(features[~held_out], labels[~held_out], seed), {})
        predicted = np.argmax(forest.probabilities(features[held_out]), axis=1)
        majority = np.bincount(labels[~held_out], minlength=len(TIERS)).argmax()
        per_model.append({"model": analysis.model, "blocks": int(held_out.sum()),
                          "agreement": float((predicted == labels[held_out]).mean()),
                          "majority_baseline": float((labels[held_out] == majority).mean())})
    if not per_model:
        return {"leave_one_model_out": [], "note": "one model only: no held-out evaluation possible"}
    total = sum(entry["blocks"] for entry in per_model)
    return {"leave_one_model_out": per_model,
            "agreement": sum(entry["agreement"] * entry["blocks"] for entry in per_model) / total,
            "majority_baseline": sum(entry["majority_baseline"] * entry["blocks"] for entry in per_model) / total}


def fastewq_plan(model: SourceModel, classifier: Classifier, types: TierTypes, *,
                 embed_type: Optional[str] = None, output_type: Optional[str] = None) -> Plan:
    """EWQ tiers predicted from `model`'s names and shapes: reads no tensor data."""
    block_params = block_matrix_params(model)
    features = block_features(block_params)
    probabilities = classifier.probabilities(features)
    blocks = []
    for index, (params, row) in enumerate(zip(block_params, probabilities)):
        tier = TIERS[int(np.argmax(row))]
        blocks.append({"block": index, "params": params, "score": float(row.max()),
                       "probabilities": {name: round(float(p), 4) for name, p in zip(TIERS, row)}, "tier": tier,
                       "why": f"FastEWQ predicts {tier} (p {row.max():.2f}) at depth {index}/{len(block_params)}"})
    params = {**{f"labels_{key}": value for key, value in classifier.labels.items()},
              "trained_on": [entry["model"] for entry in classifier.trained_on]}
    return tiered_plan(model, "fastewq", params, blocks, types, embed_type, output_type)


@dataclass(frozen=True)
class FastEwqOptions(TierOptions):
    # the EWQ settings the classifier learnt are its own; these options only check that they are the ones meant
    k: Optional[float] = option(None, "The EWQ k the classifier learnt; another is refused.", value_type=float,
                                default_text="the classifier's")
    entropy: Optional[str] = option(None, "The EWQ entropy the classifier learnt; another is refused.",
                                    choices=ENTROPY_STATISTICS, default_text="the classifier's")
    direction: Optional[str] = option(None, "The EWQ direction the classifier learnt; another is refused.",
                                      choices=DIRECTIONS, default_text="the classifier's")
    classifier: Optional[str | Path] = option(None, "A classifier from `ewq-gguf fastewq train`.", file=True,
                                              default_text="the one shipped")


@register_planner("fastewq", FastEwqOptions, help="EWQ's tiers predicted from metadata only (reads no weight)")
def make(model: SourceModel, options: FastEwqOptions, context: PlanContext) -> Plan:
    types = TierTypes.parse(options.types)
    trained = Classifier.load(options.classifier)
    asked = {"entropy": options.entropy, "k": options.k, "direction": options.direction}
    differing = {key: value for key, value in asked.items() if value is not None and value != trained.labels[key]}
    if differing:
        raise InputError(f"the FastEWQ classifier predicts the tiers of EWQ with {trained.labels}, not {differing}; "
                         "train one for these settings with `ewq-gguf fastewq train`")
    return fastewq_plan(model, trained, types, embed_type=options.embed_type, output_type=options.output_type)


def format_evaluation(classifier: Classifier) -> str:
    """The training set and the leave-one-model-out agreement with full EWQ, as text."""
    labels = classifier.labels
    lines = [f"FastEWQ forest of {len(classifier.trees)} trees, learning EWQ tiers ({labels['entropy']} entropy, "
             f"k {labels['k']}, {labels['direction']}) of: "
             + ", ".join(f"{entry['model']} ({entry['n_blocks']} blocks)" for entry in classifier.trained_on)]
    evaluation = classifier.evaluation
    for entry in evaluation.get("leave_one_model_out", []):
        lines.append(f"  held out {entry['model']}: agreement {entry['agreement']:.1%} "
                     f"(always the majority tier: {entry['majority_baseline']:.1%})")
    if "agreement" in evaluation:
        lines.append(f"  leave-one-model-out agreement {evaluation['agreement']:.1%}, "
                     f"majority baseline {evaluation['majority_baseline']:.1%}")
    else:
        lines.append(f"  {evaluation.get('note', 'no evaluation')}")
    return "\n".join(lines)
