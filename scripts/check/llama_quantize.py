"""Parity with llama-quantize --pure: per tensor, does ewq-gguf store the same type and the same bytes?

For each requested type T: `ewq-gguf convert MODEL OUT --method uniform --type T` against `llama-quantize --pure`
of an F32 GGUF that ewq-gguf made of the same folder (llama-quantize's file types: Q4_K_S for Q4_K, Q5_K_S for
Q5_K, Q3_K_S for Q3_K, MXFP4_MOE for MXFP4, the type's own name otherwise). Tensors both files store in the same
type are compared byte for byte; tensors stored in different types (ewq-gguf's uniform method keeps the token
embedding and output head in Q8_0 by default, --pure does not) are listed, not compared.

A second check runs the same comparison on a tiny Llama whose rows are 96 and 100 values long (testkit/tiny_models),
where every 256-block type falls back, and checks the type of every matrix llama-quantize wrote against
ewq_gguf.quant.effective_type.

    python -m scripts.check.llama_quantize [MODEL_DIR] [--types Q4_K,Q8_0] [--no-narrow] [--results docs/results.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from ewq_gguf import llamacpp
from ewq_gguf.devenv import dev_model
from ewq_gguf.quant import QType, effective_type
from scripts.common.llama_tools import run_measured
from scripts.common.results_file import shown, update_section

DEFAULT_TYPES = "Q4_K,Q5_K,Q6_K,Q3_K,Q2_K,Q8_0,Q4_0,Q5_0,Q4_1,Q5_1,IQ4_NL,IQ4_XS,MXFP4"
# llama-quantize's file type for a type, where it is not the type's name: a mixture that --pure turns into that type
FILE_TYPES = {QType.Q4_K: "Q4_K_S", QType.Q5_K: "Q5_K_S", QType.Q3_K: "Q3_K_S", QType.MXFP4: "MXFP4_MOE"}


@dataclass
class Comparison:
    compared: int = 0  # tensors both files hold
    same_type: int = 0
    same_bytes: int = 0
    type_differs: list[str] = field(default_factory=list)  # "name: ours X, llama-quantize Y"
    bytes_differ: list[str] = field(default_factory=list)
    only_one: list[str] = field(default_factory=list)  # tensors one file lacks


def compare_files(ours: Path, theirs: Path) -> Comparison:
    """Tensor by tensor: same type? same bytes (where the type is the same)?"""
    ours_tensors = {t.name: t for t in GGUFReader(str(ours)).tensors}
    theirs_tensors = {t.name: t for t in GGUFReader(str(theirs)).tensors}
    result = Comparison(only_one=sorted(set(ours_tensors) ^ set(theirs_tensors)))
    for name in sorted(set(ours_tensors) & set(theirs_tensors)):
        mine, other = ours_tensors[name], theirs_tensors[name]
        result.compared += 1
        if mine.tensor_type != other.tensor_type:
            result.type_differs.append(f"{name}: ours {mine.tensor_type.name}, llama-quantize {other.tensor_type.name}")
            continue
        result.same_type += 1
        if np.array_equal(np.asarray(mine.data).view(np.uint8).reshape(-1),
                          np.asarray(other.data).view(np.uint8).reshape(-1)):
            result.same_bytes += 1
        else:
            result.bytes_differ.append(name)
    return result


def fallback_mismatches(theirs: Path, requested: QType) -> tuple[int, list[str]]:
    """(matrices checked, those whose llama-quantize type is not effective_type(requested, row length))."""
    checked, wrong = 0, []
    for tensor in GGUFReader(str(theirs)).tensors:
        if len(tensor.shape) != 2:
            continue
        checked += 1
        expected = effective_type(requested, int(tensor.shape[0]))
        if tensor.tensor_type != expected:
            wrong.append(f"{tensor.name}: llama-quantize {tensor.tensor_type.name}, effective_type {expected.name}")
    return checked, wrong


def convert_ours(model_dir: Path, out: Path, type_name: str, extra: list[str]) -> float:
    run = run_measured([sys.executable, "-m", "ewq_gguf", "convert", model_dir, out, "--method", "uniform",
                        "--type", type_name, "--quiet", "--force", *extra])
    return run.wall_s


def quantize_theirs(llama_quantize: Path, f32: Path, out: Path, qtype: QType, threads: int) -> float:
    run = run_measured([llama_quantize, "--pure", f32, out, FILE_TYPES.get(qtype, qtype.name), str(threads)])
    return run.wall_s


def _listing(items: list[str], limit: int = 6) -> str:
    if not items:
        return "-"
    shown = "; ".join(items[:limit])
    return shown + (f"; ... ({len(items)} in all)" if len(items) > limit else "")


def compare_model(model_dir: Path, types: list[QType], work: Path, llama_quantize: Path, threads: int,
                  extra: list[str], check_fallback: bool) -> str:
    """Run every type on one model folder; returns the markdown table."""
    f32 = work / "f32.gguf"
    convert_ours(model_dir, f32, "F32", [])
    header = "| type | llama-quantize ftype | tensors | same type | same bytes | ours s | llama-quantize s |"
    columns = 7 + (1 if check_fallback else 0)
    if check_fallback:
        header += " llama-quantize types = effective_type |"
    lines = [header, "|" + "---|" * columns]
    details = []
    for qtype in types:
        ours, theirs = work / f"ours-{qtype.name}.gguf", work / f"llama-{qtype.name}.gguf"
        ours_s = convert_ours(model_dir, ours, qtype.name, extra)
        theirs_s = quantize_theirs(llama_quantize, f32, theirs, qtype, threads)
        result = compare_files(ours, theirs)
        cells = [qtype.name, FILE_TYPES.get(qtype, qtype.name), str(result.compared), str(result.same_type),
                 str(result.same_bytes), f"{ours_s:.1f}", f"{theirs_s:.1f}"]
        if check_fallback:
            checked, wrong = fallback_mismatches(theirs, qtype)
            cells.append(f"{checked - len(wrong)}/{checked}")
            details += [f"- {qtype.name}: type differs from effective_type: {item}" for item in wrong]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if result.type_differs:
            details.append(f"- {qtype.name}: stored in different types (not compared): {_listing(result.type_differs)}")
        if result.bytes_differ:
            details.append(f"- {qtype.name}: SAME TYPE, DIFFERENT BYTES: {_listing(result.bytes_differ)}")
        if result.only_one:
            details.append(f"- {qtype.name}: in one file only: {_listing(result.only_one)}")
        ours.unlink()
        theirs.unlink()
    f32.unlink()
    return "\n".join(lines + ([""] + details if details else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", default=dev_model("smollm2"), help="default: %(default)s")
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-quantize's threads")
    parser.add_argument("--no-narrow", action="store_true", help="skip the tiny model with rows of 96 and 100")
    parser.add_argument("--convert-arg", action="append", default=[],
                        help="extra argument for ewq-gguf convert (repeat it), e.g. --convert-arg=--embed-type=Q4_K")
    parser.add_argument("--results", type=Path, help="write the tables into this markdown file's sections")
    args = parser.parse_args()
    llama_quantize = llamacpp.tool("llama-quantize")
    if llama_quantize is None:
        sys.exit("llama-quantize is not built: run vendor/build_llama_tools.sh first")
    model_dir = Path(args.model_dir)
    types = [QType[name.strip().upper()] for name in args.types.split(",")]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    extra = "".join(f" {arg}" for arg in args.convert_arg)
    note = (f"ewq-gguf `convert --method uniform --type T{extra}`"
            f" against `llama-quantize --pure` of ewq-gguf's F32 GGUF ({args.threads} threads). \"same type\": "
            "tensors both files store in the same type; \"same bytes\": of those, the ones byte-identical.")
    sections = []
    with tempfile.TemporaryDirectory(dir=".", prefix="compare-llama-quantize-") as work:
        print(f"{model_dir}:", flush=True)
        table = compare_model(model_dir, types, Path(work), llama_quantize, args.threads, args.convert_arg, False)
        sections.append((f"Parity with llama-quantize --pure ({model_dir.resolve().name})", table))
        if not args.no_narrow:
            from testkit.tiny_models import make_tiny_model

            tiny = make_tiny_model(Path(work) / "tiny-odd-width", "LlamaForCausalLM", hidden_size=96,
                                   intermediate_size=100, num_attention_heads=2, num_key_value_heads=1)
            print("tiny Llama, rows of 96 and 100:", flush=True)
            table = compare_model(tiny, types, Path(work), llama_quantize, args.threads, args.convert_arg, True)
            sections.append(("Parity with llama-quantize --pure (tiny Llama, rows of 96 and 100)", table))
    footer = f"Load average (1 min) {load:.2f} at the start; {time.perf_counter() - started:.0f} s in all."
    for title, table in sections:
        print(f"\n## {title}\n\n{note}\n\n{table}\n\n{footer}")
        if args.results:
            command = f"python -m scripts.check.llama_quantize {shown(model_dir)} --results {shown(args.results)}"
            update_section(args.results, title, f"{note}\n\n{table}\n\n{footer}", command=command)


if __name__ == "__main__":
    main()
