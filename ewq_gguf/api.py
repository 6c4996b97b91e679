"""The public API. The CLI is a thin layer over these functions; they never print (progress goes to tqdm)."""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .calibrate import Calibration, load_importance
from .calibrate.imatrix import ImportanceMatrix
from .calibrate.workfolder import work_folder_for
from .constants import DEFAULT_EVALUATION_CTX, DEFAULT_GPTQ_TOKENS, DEFAULT_ROUNDING, ROUNDINGS
from .device import resolve_device
from .errors import InputError
from .gguf_file.header import planned_file_size
from .plan import Plan
from .plan.registry import TYPE_ONLY_METHOD, PlanContext, planner_for
from .plan.reuse import plan_from_file
from .source.model import SourceModel, open_checkpoint
from .timing import StageTimes
from .write import check_output, parse_size, write_gguf


@dataclass(frozen=True)
class ConvertResult:
    """What convert wrote (or, for a dry run, would write)."""

    path: Optional[Path]
    bytes: int
    bits_per_weight: float
    plan: Plan
    seconds: float
    # busy seconds per stage (plan, read, quantize, write, ...); read and quantize overlap writing
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # validate=True: the base (F16 reference) first, then this file, as validate.compare reports them
    validation: Optional[list] = None
    modelfile: Optional[Path] = None


def make_plan(model: SourceModel, method: Optional[str] = None, *, plan: Optional[str | Path] = None,
              importance: Optional[ImportanceMatrix] = None, device: str = "auto", progress: bool = True,
              rounding: str = DEFAULT_ROUNDING, **options: Any) -> Plan:
    """Decide the type of every tensor of `model` by `method`, or reuse a plan file / GGUF's types (`plan`).

    method: a planner's name (ewq_gguf.plan.registry.planners()); None means ewq, or uniform when `type` is given.
    options: the method's, the fields of its options dataclass (None: the method's default); one the method does not
    take is an InputError. importance: the importance matrix the file will be quantized with. rounding: how the
    file will be rounded ("gptq" records the rounding per tensor in the plan, which planners sizing the whole file
    must count).
    """
    if plan is not None:
        return plan_from_file(model, plan)
    given = {name: value for name, value in options.items() if value is not None}
    planner = planner_for(method, given)
    if "type" in given and not planner.takes("type"):
        raise InputError(f"--type applies to --method {TYPE_ONLY_METHOD}; --method {planner.name} takes --types "
                         "LOW,MID,HIGH")
    if rounding == "gptq":
        from .calibrate.gptq_pass import reserved_rounding

        def file_size(candidate: Plan) -> int:
            return planned_file_size(model, reserved_rounding(candidate))
    else:
        def file_size(candidate: Plan) -> int:
            return planned_file_size(model, candidate)
    context = PlanContext(device, progress, importance, file_size)
    return planner.make(model, planner.options_from(given), context)


def convert(model_dir: str | Path, out: str | Path, method: Optional[str] = None, *, device: str = "auto", force: bool = False, plan: Optional[str | Path] = None,
            plan_out: Optional[str | Path] = None, dry_run: bool = False, progress: bool = True,
            allow_pickle: bool = False, split_max_size: Optional[int | str] = None, imatrix: Optional[str | Path] = None,
            validate: bool = False, base: Optional[str | Path] = None, text: Optional[str | Path] = None,
            ollama_modelfile: bool = False, rounding: str = DEFAULT_ROUNDING, gptq_tokens: Optional[int] = None,
            gptq_sequential: bool = False, **options: Any) -> ConvertResult:
    """Convert a Hugging Face checkpoint folder into a GGUF file at `out`.

    method and `options`: make_plan's, a planner's name and its options (`ewq-gguf convert --help` lists them):
    ewq by default, uniform when `type` is given.
    A dry run decides the plan and computes the exact file size without writing it.
    allow_pickle: read pytorch_model*.bin checkpoints (torch.load weights_only) when no safetensors exist.
    split_max_size: bytes of tensor data per file (or text like '2G'); larger outputs are written as llama.cpp's
    OUT-00001-of-0000N.gguf parts, and the result's path is the first part.
    imatrix: importance-weighted quantization with the vectors of a calibration JSON (`ewq-gguf calibrate`) or of an
    importance matrix file written by llama-imatrix (GGUF or legacy .dat). Methods that plan from a calibration
    (lim, optimal) calibrate on the default text first when no `calibration` is given.
    validate: after writing, compare the file with `base` (default: an F16 conversion of the same checkpoint) on
    `text` through llama.cpp (result.validation). ollama_modelfile: write an Ollama Modelfile beside the GGUF.
    rounding: "nearest" (ggml's rounding) or "gptq" (error-compensating rounding in the same types, from the inputs
    of each weight on the first `gptq_tokens` tokens of the calibration's text: needs `calibration`);
    gptq_sequential: each block's inputs from the blocks before it as rounded, not from the unquantized model.
    """
    started = time.perf_counter()
    model = open_checkpoint(model_dir, allow_pickle=allow_pickle)
    result = convert_source(model, out, method, device=device, force=force, plan=plan, plan_out=plan_out,
                            dry_run=dry_run, progress=progress, split_max_size=split_max_size, imatrix=imatrix,
                            calibrate_from=model_dir, started=started, rounding=rounding, gptq_tokens=gptq_tokens,
                            gptq_sequential=gptq_sequential, **options)
    if dry_run or result.path is None:
        return result
    validation = validate_written(model_dir, result.path, base=base, text=text, allow_pickle=allow_pickle,
                                  progress=progress) if validate else None
    modelfile = None
    if ollama_modelfile:
        from .write import write_ollama_modelfile

        modelfile = write_ollama_modelfile(result.path)
    return dataclasses.replace(result, validation=validation, modelfile=modelfile)


def convert_source(model: SourceModel, out: str | Path, method: Optional[str] = None, *, device: str = "auto", force: bool = False, plan: Optional[str | Path] = None,
                   plan_out: Optional[str | Path] = None, dry_run: bool = False, progress: bool = True,
                   split_max_size: Optional[int | str] = None, imatrix: Optional[str | Path] = None,
                   calibrate_from: Optional[str | Path] = None, started: Optional[float] = None,
                   rounding: str = DEFAULT_ROUNDING, gptq_tokens: Optional[int] = None, gptq_sequential: bool = False,
                   **options: Any) -> ConvertResult:
    """The one pipeline behind convert and export: plan an opened model (a checkpoint folder's or one in memory)
    and write it. calibrate_from: the checkpoint folder that methods taking a calibration calibrate on when no
    `calibration` is given."""
    started = time.perf_counter() if started is None else started
    times = StageTimes()
    out = Path(out)
    split_bytes = parse_size(split_max_size) if split_max_size is not None else 0
    if not dry_run:
        check_output(out, force)
    importance = load_importance(imatrix, model) if imatrix is not None else None
    if rounding not in ROUNDINGS:
        raise InputError(f"unknown rounding '{rounding}' (one of {', '.join(ROUNDINGS)})")
    planner = planner_for(method, options) if plan is None else None
    rounding_calibration = None
    if rounding == "gptq":
        if calibrate_from is None:
            raise InputError("--rounding gptq reads the checkpoint block by block: convert a saved checkpoint folder")
        rounding_calibration = options.get("calibration")
        if rounding_calibration is None:
            raise InputError("--rounding gptq needs --calibration (a calibration JSON from `ewq-gguf calibrate`)")
        if planner is None or not planner.takes("calibration"):
            options.pop("calibration")  # given for the rounding only
        if not isinstance(rounding_calibration, Calibration):
            rounding_calibration = Calibration.load(rounding_calibration)
        rounding_calibration.check_matches(model)
    if planner is not None and planner.takes("calibration") and options.get("calibration") is None:
        if calibrate_from is None:
            raise InputError(f"method {planner.name} on a model in memory needs calibration= (a Calibration, or the "
                             "JSON of `ewq-gguf calibrate` run on the saved checkpoint)")
        from .calibrate import calibrate as run_calibration

        with times.measure("calibrate"):
            options["calibration"] = run_calibration(calibrate_from, device=device, progress=progress)
    with times.measure("plan"):
        decided = make_plan(model, method, plan=plan, importance=importance, device=device, progress=progress,
                            rounding=rounding, **options)
    encoded = None
    if rounding == "nearest" and any(entry.rounding != "nearest" or entry.rounding_note for entry in decided.entries):
        # a reused plan of a GPTQ file: this file is rounded to nearest, and its plan must say so
        decided = dataclasses.replace(decided, entries=[dataclasses.replace(entry, rounding="nearest", rounding_note="")
                                                        for entry in decided.entries])
    if rounding == "gptq":
        from .calibrate.gptq_pass import gptq_round, planned_rounding
        from .progress import progress_bar

        if dry_run:
            decided = planned_rounding(decided)
        else:
            with times.measure("gptq"):
                outcome = gptq_round(calibrate_from, model, decided, rounding_calibration,
                                     tokens=gptq_tokens or DEFAULT_GPTQ_TOKENS, device=resolve_device(device),
                                     importance=importance.vectors() if importance else None,
                                     sequential=gptq_sequential, work_dir=work_folder_for(out),
                                     progress_bar=lambda items, **kw: progress_bar(items, enabled=progress, **kw))
            decided, encoded = outcome.plan, outcome.encoded
            times.update({f"gptq {part}": seconds for part, seconds in outcome.seconds.items()})
    if plan_out is not None:
        decided.save(plan_out)
    if dry_run:
        return ConvertResult(None, planned_file_size(model, decided), decided.bits_per_weight, decided,
                             time.perf_counter() - started, times)
    written = write_gguf(model, decided, out, force=force, device=resolve_device(device), progress=progress,
                         split_max_size=split_bytes, importance=importance.vectors() if importance else None,
                         times=times, encoded=encoded)
    if rounding == "gptq":
        shutil.rmtree(work_folder_for(out), ignore_errors=True)   # GPTQ's work folder, once the file is complete
    return ConvertResult(written.path, written.bytes, decided.bits_per_weight, decided, time.perf_counter() - started,
                         times)


def validate_written(model_dir: str | Path, written: Path, *, base: Optional[str | Path] = None,
                     text: Optional[str | Path] = None, ctx: int = DEFAULT_EVALUATION_CTX,
                     chunks: Optional[int] = None, allow_pickle: bool = False, progress: bool = True) -> list:
    """Compare a freshly written GGUF with a reference through llama.cpp: KLD, top-1 agreement and PPL.

    The reference is `base` when given, else an F16 conversion of the same checkpoint made in a temporary folder
    beside nothing the user owns (deleted afterwards)."""
    from .validate import compare as compare_files

    if base is not None:
        return compare_files(base, [written], text=text, ctx=ctx, chunks=chunks, progress=progress)
    with tempfile.TemporaryDirectory(prefix="ewq-gguf-reference-") as scratch:
        reference = Path(scratch) / "reference-f16.gguf"
        convert(model_dir, reference, "uniform", type="F16", allow_pickle=allow_pickle, progress=progress)
        return compare_files(reference, [written], text=text, ctx=ctx, chunks=chunks, progress=progress)


def calibrate(model_dir: str | Path, out: str | Path, *, force: bool = False, **options: Any) -> Calibration:
    """Calibrate the checkpoint in `model_dir` (options: calibrate.calibrate's) and save it to `out` (JSON) with
    its importance matrix beside it (OUT's stem + .imatrix.gguf, llama-imatrix's format). The passes keep their
    files in OUT.work/ until the result is saved, so that a rerun after an interruption resumes there."""
    from .calibrate import calibrate as run_calibration, imatrix_path_for

    for path in (Path(out), imatrix_path_for(out)):
        check_output(path, force)
    work_dir = work_folder_for(out)
    calibration = run_calibration(model_dir, work_dir=work_dir, **options)
    calibration.save(out)
    shutil.rmtree(work_dir, ignore_errors=True)
    return calibration
