"""The public API. The CLI is a thin layer over these functions; they never print (progress goes to tqdm)."""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .analyse import Analysis, analyze
from .device import resolve_device
from .calibrate import Calibration, load_importance
from .errors import InputError
from .gguf_file.header import planned_file_size
from .calibrate.imatrix import ImportanceMatrix
from .constants import DEFAULT_EVALUATION_CTX, DEFAULT_TIER_TYPES
from .plan import Plan
from .plan.uniform import uniform_plan
from .plan import ewq as ewq_method, lim as lim_method, optimal as optimal_method, zd as zd_method
from .plan.fastewq import Classifier, fastewq_plan
from .plan.reuse import plan_from_file
from .plan.tiers import TierTypes
from .quant import parse_type
from .source.model import SourceModel, open_checkpoint
from .timing import StageTimes
from .write import check_output, parse_size, write_gguf

METHODS = ("ewq", "fastewq", "zd", "lim", "optimal", "uniform")


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


# The make_plan options each method takes; giving another is an error rather than silently ignored.
METHOD_OPTIONS = {
    "ewq": {"types", "k", "entropy", "direction", "embed_type", "output_type", "analysis"},
    "zd": {"types", "fraction", "direction", "embed_type", "output_type", "analysis"},
    "fastewq": {"types", "k", "entropy", "direction", "embed_type", "output_type", "classifier"},
    "lim": {"types", "fraction", "embed_type", "output_type", "calibration"},
    "optimal": {"types", "calibration", "target_size", "target_bpw", "metric"},
    "uniform": set(),
}


def make_plan(model: SourceModel, method: Optional[str] = None, *, type: Optional[str] = None,
              plan: Optional[str | Path] = None, types: Optional[str] = None, k: Optional[float] = None,
              fraction: Optional[float] = None, entropy: Optional[str] = None, direction: Optional[str] = None,
              embed_type: Optional[str] = None, output_type: Optional[str] = None,
              analysis: Optional[Analysis | str | Path] = None, classifier: Optional[str | Path] = None,
              calibration: Optional[Calibration | str | Path] = None, target_size: Optional[int | str] = None,
              target_bpw: Optional[float] = None, metric: Optional[str] = None,
              importance: Optional[ImportanceMatrix] = None, device: str = "auto", progress: bool = True) -> Plan:
    """Decide the type of every tensor of `model` by `method`, or reuse a plan file / GGUF's types.

    method None means ewq, or uniform when `type` is given. ewq and zd analyse the weights (or take `analysis`,
    an Analysis or its JSON); fastewq and uniform read no tensor data. Options left None take the method's default.
    """
    if plan is not None:
        return plan_from_file(model, plan)
    method = method or ("uniform" if type is not None else "ewq")
    if method not in METHODS:
        raise InputError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    given = {"types": types, "k": k, "fraction": fraction, "entropy": entropy, "direction": direction,
             "embed_type": embed_type, "output_type": output_type, "analysis": analysis, "classifier": classifier,
             "calibration": calibration, "target_size": target_size, "target_bpw": target_bpw, "metric": metric}
    stray = [name for name, value in given.items() if value is not None and name not in METHOD_OPTIONS[method]]
    if stray:
        flags = ", ".join("--" + name.replace("_", "-") for name in stray)
        raise InputError(f"{flags}: not used by --method {method}")
    if method == "uniform":
        return uniform_plan(model, _type(type or "Q8_0"))
    if type is not None:
        raise InputError(f"--type applies to --method uniform; --method {method} takes --types LOW,MID,HIGH")
    if method == "optimal":
        return optimal_method.plan_for_target(
            model, _calibration(calibration, method), lambda candidate: planned_file_size(model, candidate),
            target_size=parse_size(target_size) if target_size is not None else None, target_bpw=target_bpw,
            types=types, metric=metric or optimal_method.DEFAULT_METRIC, importance=importance, progress=progress)
    tier_types = TierTypes.parse(types or DEFAULT_TIER_TYPES)
    if method == "lim":
        return lim_method.lim_plan(model, _calibration(calibration, method), tier_types,
                                   fraction=lim_method.DEFAULT_FRACTION if fraction is None else fraction,
                                   embed_type=embed_type, output_type=output_type)
    if method == "fastewq":
        trained = Classifier.load(classifier)
        asked = {"entropy": entropy, "k": k, "direction": direction}
        differing = {key: value for key, value in asked.items() if value is not None and value != trained.labels[key]}
        if differing:
            raise InputError(f"the FastEWQ classifier predicts the tiers of EWQ with {trained.labels}, not {differing}; "
                             "train one for these settings with `ewq-gguf fastewq train`")
        return fastewq_plan(model, trained, tier_types, embed_type=embed_type, output_type=output_type)
    if not isinstance(analysis, Analysis):
        analysis = Analysis.load(analysis) if analysis is not None else analyze(
            model, device=device, progress=progress)
    if method == "zd":
        return zd_method.zd_plan(model, analysis, tier_types,
                                 fraction=zd_method.DEFAULT_FRACTION if fraction is None else fraction,
                                 direction=direction or zd_method.DEFAULT_DIRECTION, embed_type=embed_type,
                                 output_type=output_type)
    return ewq_method.ewq_plan(model, analysis, tier_types, k=ewq_method.DEFAULT_K if k is None else k,
                               entropy=entropy or ewq_method.DEFAULT_ENTROPY,
                               direction=direction or ewq_method.DEFAULT_DIRECTION,
                               embed_type=embed_type, output_type=output_type)


def convert(model_dir: str | Path, out: str | Path, method: Optional[str] = None, *, type: Optional[str] = None,
            device: str = "auto", force: bool = False, plan: Optional[str | Path] = None,
            plan_out: Optional[str | Path] = None, dry_run: bool = False, progress: bool = True,
            allow_pickle: bool = False, split_max_size: Optional[int | str] = None,
            imatrix: Optional[str | Path] = None, validate: bool = False, base: Optional[str | Path] = None,
            text: Optional[str | Path] = None, ollama_modelfile: bool = False, **options: Any) -> ConvertResult:
    """Convert a Hugging Face checkpoint folder into a GGUF file at `out`.

    method: ewq (the default), fastewq, zd, lim, optimal, or uniform (the default when `type` is given); `options`
    are make_plan's (types, k, fraction, entropy, direction, embed_type, output_type, analysis, classifier,
    calibration, target_size, target_bpw, metric), each taken only by the methods METHOD_OPTIONS names.
    A dry run decides the plan and computes the exact file size without writing it.
    allow_pickle: read pytorch_model*.bin checkpoints (torch.load weights_only) when no safetensors exist.
    split_max_size: bytes of tensor data per file (or text like '2G'); larger outputs are written as llama.cpp's
    OUT-00001-of-0000N.gguf parts, and the result's path is the first part.
    imatrix: importance-weighted quantization with the vectors of a calibration JSON (`ewq-gguf calibrate`) or of an
    importance matrix file written by llama-imatrix (GGUF or legacy .dat). Methods lim and optimal calibrate on
    the default text first when no `calibration` is given.
    validate: after writing, compare the file with `base` (default: an F16 conversion of the same checkpoint) on
    `text` through llama.cpp (result.validation). ollama_modelfile: write an Ollama Modelfile beside the GGUF.
    """
    started = time.perf_counter()
    model = open_checkpoint(model_dir, allow_pickle=allow_pickle)
    result = convert_source(model, out, method, type=type, device=device, force=force, plan=plan, plan_out=plan_out,
                            dry_run=dry_run, progress=progress, split_max_size=split_max_size, imatrix=imatrix,
                            calibrate_from=model_dir, started=started, **options)
    if dry_run or result.path is None:
        return result
    validation = validate_written(model_dir, result.path, base=base, text=text, allow_pickle=allow_pickle,
                                  progress=progress) if validate else None
    modelfile = None
    if ollama_modelfile:
        from .write import write_ollama_modelfile

        modelfile = write_ollama_modelfile(result.path)
    return dataclasses.replace(result, validation=validation, modelfile=modelfile)


def convert_source(model: SourceModel, out: str | Path, method: Optional[str] = None, *, type: Optional[str] = None,
                   device: str = "auto", force: bool = False, plan: Optional[str | Path] = None,
                   plan_out: Optional[str | Path] = None, dry_run: bool = False, progress: bool = True,
                   split_max_size: Optional[int | str] = None, imatrix: Optional[str | Path] = None,
                   calibrate_from: Optional[str | Path] = None, started: Optional[float] = None,
                   **options: Any) -> ConvertResult:
    """The one pipeline behind convert and export: plan an opened model (a checkpoint folder's or one in memory)
    and write it. calibrate_from: the checkpoint folder lim/optimal calibrate on when no `calibration` is given."""
    started = time.perf_counter() if started is None else started
    times = StageTimes()
    out = Path(out)
    split_bytes = parse_size(split_max_size) if split_max_size is not None else 0
    if not dry_run:
        check_output(out, force)
    importance = load_importance(imatrix, model) if imatrix is not None else None
    if plan is None and method in ("lim", "optimal") and options.get("calibration") is None:
        if calibrate_from is None:
            raise InputError(f"method {method} on a model in memory needs calibration= (a Calibration, or the JSON "
                             "of `ewq-gguf calibrate` run on the saved checkpoint)")
        from .calibrate import calibrate as run_calibration

        with times.measure("calibrate"):
            options["calibration"] = run_calibration(calibrate_from, device=device, progress=progress)
    with times.measure("plan"):
        decided = make_plan(model, method, type=type, plan=plan, device=device, progress=progress,
                            importance=importance, **options)
    if plan_out is not None:
        decided.save(plan_out)
    if dry_run:
        return ConvertResult(None, planned_file_size(model, decided), decided.bits_per_weight, decided,
                             time.perf_counter() - started, times)
    written = write_gguf(model, decided, out, force=force, device=resolve_device(device), progress=progress,
                         split_max_size=split_bytes, importance=importance.vectors() if importance else None,
                         times=times)
    return ConvertResult(written.path, written.bytes, decided.bits_per_weight, decided, time.perf_counter() - started,
                         times)


def validate_written(model_dir: str | Path, written: Path, *, base: Optional[str | Path] = None,
                     text: Optional[str | Path] = None, ctx: int = DEFAULT_EVALUATION_CTX, chunks: Optional[int] = None,
                     allow_pickle: bool = False, progress: bool = True) -> list:
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
    from .calibrate.workfolder import work_folder_for

    for path in (Path(out), imatrix_path_for(out)):
        check_output(path, force)
    work_dir = work_folder_for(out)
    calibration = run_calibration(model_dir, work_dir=work_dir, **options)
    calibration.save(out)
    shutil.rmtree(work_dir, ignore_errors=True)
    return calibration


def _calibration(calibration: Optional[Calibration | str | Path], method: str) -> Calibration:
    if calibration is None:
        raise InputError(f"--method {method} needs a calibration (--calibration FILE from `ewq-gguf calibrate`)")
    return calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)


def _type(name: str):
    try:
        return parse_type(name)
    except ValueError as exc:
        raise InputError(str(exc)) from None
