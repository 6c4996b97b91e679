"""The planner table: every registered method reaches the CLI and the API with its options; the position planner; the
Plan contract (typed, immutable entries, the JSON of earlier versions still read)."""
from __future__ import annotations

import dataclasses
import inspect
import json

import click
import pytest
from click.testing import CliRunner

import ewq_gguf
from ewq_gguf.api import make_plan
from ewq_gguf.cli import main
from ewq_gguf.errors import InputError
from ewq_gguf.plan import Plan, PlanEntry
from ewq_gguf.plan.registry import planners
from ewq_gguf.quant import QType
from ewq_gguf.source.model import open_checkpoint
from testkit.tiny_models import make_tiny_model


def convert_flags() -> dict[str, click.Parameter]:
    command = main.commands["convert"]
    with click.Context(command) as context:
        return {param.name: param for param in command.get_params(context)}


def test_every_planner_and_option_reaches_the_cli():
    table = planners()
    assert {"ewq", "fastewq", "zd", "lim", "optimal", "uniform", "position"} <= set(table)
    flags = convert_flags()
    assert list(flags["method"].type.choices) == list(table)
    for name, planner in table.items():
        assert name in flags["method"].help and planner.help in flags["method"].help
        for option in planner.option_fields():
            flag = flags[option.name]
            assert flag.opts == ["--" + option.name.replace("_", "-")]
            assert f"{name}" in flag.help and option.metadata["help"] in flag.help


def test_an_option_means_one_kind_of_value_and_names_no_convert_argument():
    """Flags are shared between methods, so each option name has one click type; and the planners' options travel
    as keywords of ewq_gguf.convert, which must not take them for its own."""
    kinds: dict[str, tuple] = {}
    for planner in planners().values():
        for option in planner.option_fields():
            metadata = option.metadata
            kinds.setdefault(option.name, set()).add((metadata["value_type"], metadata["choices"], metadata["file"]))
    assert all(len(kind) == 1 for kind in kinds.values()), kinds
    own = set(inspect.signature(ewq_gguf.convert).parameters) - {"options"}
    assert not own & set(kinds), own & set(kinds)


def test_options_not_taken_are_refused_everywhere(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="--k: not used by --method position"):
        ewq_gguf.plan(tiny_llama, "position", k=0.5)
    with pytest.raises(InputError, match="unknown method 'nearest' \\(choose from ewq, fastewq, lim, optimal"):
        ewq_gguf.plan(tiny_llama, "nearest")
    result = CliRunner().invoke(main, ["convert", str(tiny_llama), str(tmp_path / "x.gguf"), "--method", "uniform",
                                       "--fraction", "0.5"])
    assert result.exit_code == 2 and "--fraction: not used by --method uniform" in result.output


# --- position -------------------------------------------------------------------------------------------------------
def test_position_puts_the_last_blocks_low(tmp_path):
    checkpoint = make_tiny_model(tmp_path / "four-blocks", num_hidden_layers=4)
    model = open_checkpoint(checkpoint)
    plan = make_plan(model, "position", types="Q4_0,Q8_0,F16")
    assert [block["tier"] for block in plan.blocks] == ["MID", "MID", "MID", "LOW"]     # 0.25 x 4 blocks
    assert plan.by_name()["blk.3.ffn_down.weight"].requested == QType.Q4_0
    assert plan.by_name()["blk.0.ffn_down.weight"].requested == QType.Q8_0
    assert plan.params == {"fraction": 0.25, "low_blocks": 1, "types": ["Q4_0", "Q8_0", "F16"], "embed_type": "Q8_0",
                           "output_type": "Q8_0"}
    out = tmp_path / "position.gguf"
    result = CliRunner().invoke(main, ["convert", str(checkpoint), str(out), "--method", "position", "--fraction",
                                       "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    written = ewq_gguf.convert(checkpoint, tmp_path / "api.gguf", "position", fraction=0.5, progress=False)
    assert out.read_bytes() == written.path.read_bytes()
    assert [block["tier"] for block in written.plan.blocks] == ["MID", "MID", "LOW", "LOW"]


# --- the Plan contract ---------------------------------------------------------------------------------------------
def test_plan_entries_are_typed_and_immutable(tiny_llama):
    plan = make_plan(open_checkpoint(tiny_llama), type="Q4_K")
    entry = plan.by_name()["blk.0.ffn_down.weight"]
    assert isinstance(entry.type, QType) and isinstance(entry.requested, QType) and isinstance(entry.shape, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.type = QType.F16
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.entries = ()
    assert dataclasses.replace(entry, predicted_kld=0.5).predicted_kld == 0.5 and entry.predicted_kld is None


def test_plan_json_of_earlier_versions_still_loads():
    """Types by name and shapes as lists, as every version has written them; predicted_kld only where set."""
    earlier = {"format": 1, "method": "optimal", "params": {"predicted_kld": 0.5}, "blocks": [], "entries": [
        {"name": "output.weight", "shape": [64, 576], "requested": "Q4_K", "type": "Q5_0", "nbytes": 22528,
         "block": None, "reason": "alpha x t2 = 0.5", "predicted_kld": 0.5},
        {"name": "output_norm.weight", "shape": [64], "requested": "F32", "type": "F32", "nbytes": 256,
         "block": None, "reason": "1-D tensors stay F32"}]}
    plan = Plan.from_dict(earlier)
    assert plan.entries[0] == PlanEntry("output.weight", (64, 576), QType.Q4_K, QType.Q5_0, 22528, None,
                                        "alpha x t2 = 0.5", 0.5)
    assert plan.entries[0].fell_back and plan.to_dict() == earlier
    assert json.loads(plan.to_json()) == earlier
    earlier["entries"][1]["type"] = "Q9_X"
    with pytest.raises(InputError, match="tensor 'output_norm.weight': unknown type 'Q9_X'"):
        Plan.from_dict(earlier)
