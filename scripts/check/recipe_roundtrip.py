"""Round trip of a --plan-out recipe through llama-quantize: does `llama-quantize --tensor-type-file RECIPE` give every
tensor the type ewq-gguf gives it, and the same bytes?

For each plan: `ewq-gguf convert MODEL X --dry-run --plan-out recipe.txt ARGS` writes the recipe, `ewq-gguf convert
MODEL ours.gguf --plan-out written.txt ARGS` writes our file (its recipe must equal the dry run's), and
`llama-quantize --tensor-type-file recipe.txt F32.gguf theirs.gguf Q8_0` quantizes an F32 GGUF that ewq-gguf made of
the same folder. Tensors are compared by name: type, and bytes where the types agree.

The base type: llama-quantize applies the file only when the base type is a quantized one (src/llama-quant.cpp,
llama_tensor_get_type: `if (ggml_is_quantized(default_type))`; with F16/BF16/F32 the file is silently ignored), and
the recipe names every matrix, so the base type decides nothing else. A second run with base Q4_0 checks that.
1-D tensors (norms) are never converted by llama-quantize and stay F32 as in the source, as in ours. The token
embedding and the output head follow the recipe like every other matrix because no --token-embedding-type /
--output-tensor-type is passed (those would take precedence over the file).

llama-quantize reads each recipe name as a regular expression it searches for in tensor names, first listed match
wins. The "unanchored" column runs the recipe once more with plain names instead of ewq-gguf's ^escaped$ patterns
(the format before anchoring): on a model with a separate output head, `output.weight` then also claims every
`blk.N.attn_output.weight` listed after it.

    python -m scripts.check.recipe_roundtrip [MODEL_DIR] [--calibration CAL.json] [--no-tiny]
                                             [--results docs/results.md]

--calibration (a JSON of `ewq-gguf calibrate` on MODEL_DIR) adds an optimal plan at 5 bits per weight.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

from ewq_gguf import llamacpp
from ewq_gguf.devenv import dev_model
from scripts.check.llama_quantize import Comparison, _listing, compare_files
from scripts.common.llama_tools import run_measured
from scripts.common.results_file import shown, update_section

TITLE = "Recipe round trip: --plan-out through llama-quantize --tensor-type-file"
BASE_TYPE = "Q8_0"          # any quantized type: the recipe names every matrix
SECOND_BASE_TYPE = "Q4_0"
# label -> ewq-gguf convert arguments
PLANS: dict[str, list[str]] = {
    "ewq (default)": [],
    "zd --fraction 0.5": ["--method", "zd", "--fraction", "0.5"],
    "fastewq": ["--method", "fastewq"],
    "uniform Q4_K": ["--method", "uniform", "--type", "Q4_K"],
}
OPTIMAL_BPW = "5"


@dataclass
class RoundTrip:
    label: str
    type_mix: str               # matrix types of our file
    recipe_lines: int
    recipes_agree: bool         # the dry run's recipe equals the one written with the file
    result: Comparison          # ours vs llama-quantize with the recipe
    base_independent: bool      # llama-quantize's tensors are the same with SECOND_BASE_TYPE
    unanchored: Comparison      # ours vs llama-quantize with plain-name recipe lines
    ours_s: float
    dry_run_s: float
    theirs_s: float


def ewq_convert(model_dir: Path, out: Path, args: list[str]) -> float:
    return run_measured([sys.executable, "-m", "ewq_gguf", "convert", model_dir, out, *args, "--quiet",
                         "--force"]).wall_s


def llama_quantize(tool: Path, recipe: Path, f32: Path, out: Path, base_type: str, threads: int) -> float:
    return run_measured([tool, "--tensor-type-file", recipe, f32, out, base_type, str(threads)]).wall_s


def unanchored_recipe(recipe: str) -> str:
    """The same recipe with plain tensor names: ^ and $ dropped, escapes undone."""
    lines = []
    for line in recipe.split():
        pattern, _, qtype = line.partition("=")
        lines.append(re.sub(r"\\(.)", r"\1", pattern.removeprefix("^").removesuffix("$")) + "=" + qtype)
    return "\n".join(lines) + "\n"


def matrix_types(path: Path) -> str:
    counts = Counter(tensor.tensor_type.name for tensor in GGUFReader(str(path)).tensors if len(tensor.shape) >= 2)
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common())


def round_trip(model_dir: Path, label: str, args: list[str], f32: Path, work: Path, tool: Path,
               threads: int) -> RoundTrip:
    recipe, written_recipe = work / "recipe.txt", work / "written.txt"
    ours, theirs, second, loose = (work / f"{stem}.gguf" for stem in ("ours", "theirs", "second", "unanchored"))
    dry_run_s = ewq_convert(model_dir, work / "dry-run.gguf", [*args, "--dry-run", "--plan-out", str(recipe)])
    ours_s = ewq_convert(model_dir, ours, [*args, "--plan-out", str(written_recipe)])
    theirs_s = llama_quantize(tool, recipe, f32, theirs, BASE_TYPE, threads)
    llama_quantize(tool, recipe, f32, second, SECOND_BASE_TYPE, threads)
    loose_recipe = work / "unanchored.txt"
    loose_recipe.write_text(unanchored_recipe(recipe.read_text()))
    llama_quantize(tool, loose_recipe, f32, loose, BASE_TYPE, threads)
    base_check = compare_files(theirs, second)
    trip = RoundTrip(label, matrix_types(ours), len(recipe.read_text().split()),
                     recipe.read_text() == written_recipe.read_text(), compare_files(ours, theirs),
                     base_check.same_bytes == base_check.compared and not base_check.only_one,
                     compare_files(ours, loose), ours_s, dry_run_s, theirs_s)
    for path in (recipe, written_recipe, loose_recipe, ours, theirs, second, loose):
        path.unlink()
    return trip


def table(trips: list[RoundTrip]) -> str:
    lines = ["| plan | matrix types (ours) | recipe lines | tensors | same type | byte-identical | differing tensors "
             f"| base {SECOND_BASE_TYPE} = base {BASE_TYPE} | unanchored recipe: types differ | ours s | dry run s "
             "| llama-quantize s |", "|" + "---|" * 12]
    notes = []
    for trip in trips:
        result = trip.result
        differing = result.type_differs + [f"{name}: same type, different bytes" for name in result.bytes_differ] + \
            [f"{name}: in one file only" for name in result.only_one]
        cells = [trip.label, trip.type_mix, str(trip.recipe_lines), str(result.compared), str(result.same_type),
                 str(result.same_bytes), _listing(differing, 3), "yes" if trip.base_independent else "NO",
                 str(len(trip.unanchored.type_differs)), f"{trip.ours_s:.1f}", f"{trip.dry_run_s:.1f}",
                 f"{trip.theirs_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if not trip.recipes_agree:
            notes.append(f"- {trip.label}: the dry run's recipe differs from the one written with the file")
        if trip.unanchored.type_differs:
            notes.append(f"- {trip.label}, unanchored recipe: {_listing(trip.unanchored.type_differs, 3)}")
    return "\n".join(lines + ([""] + notes if notes else []))


def run_model(model_dir: Path, plans: dict[str, list[str]], work: Path, tool: Path, threads: int) -> tuple[str, float]:
    """All plans on one model; the markdown table and the seconds the F32 base took."""
    f32 = work / "f32.gguf"
    f32_s = ewq_convert(model_dir, f32, ["--method", "uniform", "--type", "F32"])
    trips = [round_trip(model_dir, label, args, f32, work, tool, threads) for label, args in plans.items()]
    f32.unlink()
    return table(trips), f32_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default=dev_model("smollm2"), help="default: %(default)s")
    parser.add_argument("--calibration", type=Path, help="calibration JSON of MODEL_DIR: adds an optimal plan")
    parser.add_argument("--threads", type=int, default=1, help="llama-quantize's threads")
    parser.add_argument("--cores", type=int, default=1, help="CPU cores this script and its children may use")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny Llama with a separate output head")
    parser.add_argument("--results", type=Path, help="write the section into this markdown file")
    args = parser.parse_args()
    tool = llamacpp.tool("llama-quantize")
    if tool is None:
        sys.exit("llama-quantize is not built: run vendor/build_llama_tools.sh first")
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])   # inherited by every child
    model_dir = Path(args.model_dir)
    plans = dict(PLANS)
    if args.calibration:
        plans[f"optimal --target-bpw {OPTIMAL_BPW}"] = ["--method", "optimal", "--calibration",
                                                        str(args.calibration.resolve()), "--target-bpw", OPTIMAL_BPW]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    parts = []
    with tempfile.TemporaryDirectory(dir=".", prefix="recipe-roundtrip-") as scratch:
        work = Path(scratch)
        print(f"{model_dir}:", flush=True)
        model_table, f32_s = run_model(model_dir, plans, work, tool, args.threads)
        parts.append(f"### {model_dir.resolve().name}\n\nF32 base by ewq-gguf: {f32_s:.1f} s.\n\n{model_table}")
        if not args.no_tiny:
            from testkit.tiny_models import make_tiny_model

            tiny = make_tiny_model(work / "tiny-llama", "LlamaForCausalLM")
            print("tiny Llama, separate output head:", flush=True)
            tiny_table, f32_s = run_model(tiny, PLANS, work, tool, args.threads)
            parts.append(f"### tiny Llama (testkit/tiny_models, 2 blocks, separate output.weight)\n\n"
                         f"F32 base by ewq-gguf: {f32_s:.1f} s.\n\n{tiny_table}")
    note = (f"Recipe: `ewq-gguf convert MODEL X --dry-run --plan-out recipe.txt ARGS`. Theirs: `llama-quantize "
            f"--tensor-type-file recipe.txt F32.gguf OUT {BASE_TYPE} {args.threads}` on an F32 GGUF ewq-gguf made of "
            "the same folder. Ours: `ewq-gguf convert MODEL OUT ARGS`. \"same type\": tensors both files store in "
            "the same type; \"byte-identical\": of those, the ones with the same bytes. "
            f"\"base {SECOND_BASE_TYPE} = base {BASE_TYPE}\": llama-quantize writes the same tensors with either base "
            "type (the file is applied only with a quantized base type; with F16/BF16/F32 llama-quantize ignores "
            "it). 1-D tensors are never converted by llama-quantize and stay F32, as in ours; the token embedding and "
            "output head follow the recipe since no --token-embedding-type / --output-tensor-type is given. "
            "\"unanchored recipe\": the same lines with plain names instead of ewq-gguf's `^escaped$` patterns; "
            "llama-quantize reads names as regular expressions, searched for, first listed match wins, so a plain "
            "`output.weight` line also claims the `blk.N.attn_output.weight` listed after it. "
            f"Everything ran on {args.cores} core(s) (CPU affinity); seconds are wall time, Python start included.")
    if args.calibration:
        calibration = json.loads(args.calibration.read_text())
        note += (f" The optimal plan's calibration: {shown(args.calibration)} ({calibration['tokens']} tokens of "
                 f"{Path(calibration['text']).name}, model {calibration['model']}).")
    footer = f"Load average (1 min) {load:.2f} at the start; {time.perf_counter() - started:.0f} s in all."
    body = "\n\n".join([note, *parts, footer])
    print(f"\n## {TITLE}\n\n{body}")
    if args.results:
        command = "python -m scripts.check.recipe_roundtrip " + " ".join(
            [shown(model_dir)] + ([f"--calibration {shown(args.calibration)}"] if args.calibration else [])
            + ([] if not args.no_tiny else ["--no-tiny"]) + [f"--results {shown(args.results)}"])
        update_section(args.results, TITLE, body, command=command)


if __name__ == "__main__":
    main()
