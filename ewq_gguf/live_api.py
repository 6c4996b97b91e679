"""The API for models in memory: export a transformers (or PEFT LoRA) model to GGUF without saving it first, and
analyse or plan any model: a checkpoint folder, a model in memory, or an opened SourceModel.

export() opens the model as a SourceModel (source/live.py) and hands it to the pipeline convert() uses, so both
write the same bytes for the same weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .analyse import Analysis, analyze as analyze_source
from .api import ConvertResult, convert_source, make_plan
from .errors import InputError
from .plan import Plan
from .source.live import model_device, open_live
from .source.model import SourceModel, open_checkpoint

ModelLike = Any   # a checkpoint folder (str | Path), a SourceModel, a transformers PreTrainedModel or a peft PeftModel


def export(model: Any, tokenizer: Any, out: str | Path, method: Optional[str] = None, *, device: str = "auto",
           name: Optional[str] = None, **options: Any) -> ConvertResult:
    """Write a transformers model in memory (or a peft PeftModel, LoRA merged on the fly) to the GGUF file `out`.

    The file holds the same bytes as `model.save_pretrained(d)` + `convert(d, out)` would give, without writing d
    and without copying the weights: each tensor is read from the model, in its dtype, when it is written. The model
    is not changed. tokenizer: the model's transformers tokenizer (or a folder holding one). device "auto":
    quantize on the model's GPU when it is on one, else as convert does. name: general.name (default: the last part
    of the model's name_or_path). method and `options`: convert's (type, types, k, plan, plan_out, dry_run, force,
    progress, split_max_size, imatrix, calibration, ...); lim and optimal need `calibration` given.
    """
    if tokenizer is None:
        raise InputError("export needs the model's tokenizer: a GGUF file carries the vocabulary")
    if isinstance(tokenizer, (str, Path)) and not Path(tokenizer).is_dir():
        raise InputError(f"tokenizer folder not found: {tokenizer}")
    source = open_live(model, tokenizer, name=name)
    return convert_source(source, out, method, device=_device(model, device), **options)


def analyze(model: ModelLike, *, device: str = "auto", progress: bool = True) -> Analysis:
    """Per-block entropies and ZD of `model` (a checkpoint folder, a model in memory or a SourceModel)."""
    return analyze_source(open_model(model), device=_device(model, device), progress=progress)


def plan(model: ModelLike, method: Optional[str] = None, *, device: str = "auto", progress: bool = True,
         **options: Any) -> Plan:
    """Decide every tensor's type for `model` (a checkpoint folder, a model in memory or a SourceModel) without
    writing anything; options: convert's planning options (type, types, k, analysis=an Analysis, plan=a file, ...).
    Save it with plan.save(path) or plan.to_json(), and write it later with convert(..., plan=path)."""
    if isinstance(model, Analysis):
        raise InputError("plan needs the model (its tensor names and shapes); pass the analysis as analysis=")
    return make_plan(open_model(model), method, device=_device(model, device), progress=progress, **options)


def open_model(model: ModelLike) -> SourceModel:
    """A SourceModel for a checkpoint folder, a transformers / peft model in memory, or a SourceModel itself."""
    if isinstance(model, SourceModel):
        return model
    if isinstance(model, (str, Path)):
        return open_checkpoint(model)
    return open_live(model)


def _device(model: ModelLike, device: str) -> str:
    """"auto" on a model in memory means its own GPU when it lives on one."""
    if device != "auto" or isinstance(model, (str, Path, SourceModel)):
        return device
    found = model_device(model)
    return str(found) if found is not None else device
