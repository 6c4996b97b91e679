"""Byte-identity check of the written files: every planning method on both development models, hashed.

    python -m scripts.check.identical_outputs --save baseline.json --work out/identity     # before a change
    python -m scripts.check.identical_outputs --against baseline.json --work out/identity  # after it

For each development model (ewq_gguf.devenv: models/smollm2 and models/qwen25, or under EWQ_DEV_MODELS) it writes,
through ewq_gguf.api.convert, one GGUF per case: every planning method with its defaults (lim and optimal from a
calibration), a file made with `plan=` from the plan JSON the ewq case saved, and an importance-weighted file
(`imatrix=` the calibration, optimal at a whole-file size). It prints a table of sha256 per file; --save stores the
hashes as JSON, --against compares with such a file and exits 1 when any file differs or is missing.

The calibrations (small: --tokens, on the default Debian text) are made once per model and kept as
calibration-MODEL.json in --calibration-dir (default: --work), so that the runs before and after a change plan from
the same measurements; delete them to calibrate again. torch runs on --threads threads (default 1) on the CPU: the
analysis sums entropies in float, and its plans record the scores, so the thread count is held fixed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ewq_gguf.api import convert
from ewq_gguf.calibrate import calibrate
from ewq_gguf.devenv import DEV_MODEL_NAMES, dev_model

OPTIMAL_BPW = 5.0
# the importance-weighted optimal file gets this share of the uniform (Q8_0) file's size: a budget in whole bytes
# that exercises the planner's file-size prediction
IMATRIX_SIZE_SHARE = 0.6


def calibration_for(model_name: str, folder: Path, tokens: int) -> Path:
    """The cached calibration of a development model, made now when absent."""
    path = folder / f"calibration-{model_name}.json"
    if not path.exists():
        print(f"calibrating {model_name} on {tokens} tokens ...", flush=True)
        calibration = calibrate(dev_model(model_name), tokens=tokens, ctx=512, sensitivity_tokens=min(tokens, 1024),
                                device="cpu", progress=False)
        calibration.save(path)     # the JSON appears last, once whole
    return path


def cases(calibration: Path, out: Path) -> list[tuple[str, Callable[[Path], dict[str, Any]]]]:
    """(case name, options of convert for it); a callable because some options come from earlier cases' files."""
    plan_file = out / "ewq-plan.json"     # its name is recorded in the reusing file's metadata: fixed
    return [
        ("ewq", lambda _: {"method": "ewq", "plan_out": plan_file}),
        ("fastewq", lambda _: {"method": "fastewq"}),
        ("zd", lambda _: {"method": "zd"}),
        ("lim", lambda _: {"method": "lim", "calibration": calibration}),
        ("optimal", lambda _: {"method": "optimal", "calibration": calibration, "target_bpw": OPTIMAL_BPW}),
        ("uniform", lambda _: {"method": "uniform"}),
        ("plan-reuse", lambda _: {"plan": plan_file}),
        ("optimal-imatrix", lambda files: {
            "method": "optimal", "calibration": calibration, "imatrix": calibration,
            "target_size": int(IMATRIX_SIZE_SHARE * files["uniform"].stat().st_size)}),
    ]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_all(work: Path, calibration_dir: Path, tokens: int) -> dict[str, dict[str, Any]]:
    """Write every case of every development model; "model/case" -> its bytes and sha256."""
    results = {}
    for model_name in DEV_MODEL_NAMES:
        model_dir = dev_model(model_name)
        if not model_dir.is_dir():
            sys.exit(f"development model {model_name} not found at {model_dir} "
                     f"(python -m scripts.setup.make_dev_model makes it)")
        calibration = calibration_for(model_name, calibration_dir, tokens)
        out = work / model_name
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        for case, options in cases(calibration, out):
            path = out / f"{case}.gguf"
            convert(model_dir, path, device="cpu", force=True, progress=False, **options(files))
            files[case] = path
            results[f"{model_name}/{case}"] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
            print(f"  {model_name}/{case}: {results[f'{model_name}/{case}']['sha256'][:16]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("out/identity"), help="where the files are written")
    parser.add_argument("--calibration-dir", type=Path, help="where the calibrations are kept [default: --work]")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens (only when calibrating)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--save", type=Path, help="store the hashes in this JSON file")
    parser.add_argument("--against", type=Path, help="compare with hashes stored by --save; exit 1 on a difference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calibration_dir = args.calibration_dir or args.work
    calibration_dir.mkdir(parents=True, exist_ok=True)
    expected = json.loads(args.against.read_text()) if args.against else {}
    results = write_all(args.work, calibration_dir, args.tokens)

    rows = [("file", "bytes", "sha256", "check")]
    for name, found in results.items():
        check = "" if not args.against else (
            "identical" if expected.get(name, {}).get("sha256") == found["sha256"] else "DIFFERS")
        rows.append((name, f"{found['bytes']:,}", found["sha256"], check))
    rows += [(name, "", "", "MISSING") for name in expected if name not in results]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if args.save:
        args.save.write_text(json.dumps(results, indent=1) + "\n")
        print(f"hashes: {args.save}")
    if args.against:
        identical = sum(row[3] == "identical" for row in rows[1:])
        print(f"{identical} of {len(rows) - 1} files identical to {args.against}")
        if identical < len(rows) - 1:
            sys.exit(1)


if __name__ == "__main__":
    main()
