"""READ from memory: a transformers model, or a PEFT model with LoRA adapters, as a SourceModel, copying nothing.

The tensors are those save_pretrained would write, under the same names and in the same dtype: the module tree is
walked as state_dict() walks it (parameters and persistent buffers), an output embedding tied to the input embedding
(one Parameter under two names) is left out as save_pretrained leaves it out, and the config is what config.json
would hold. Each tensor is handed over as it lives in the model (detached, on its own device); the adapter's
transform or the quantizer makes its working copy of one tensor at a time. Weights that accelerate offloaded
(device_map with "cpu" or "disk") are read from its offload map when asked for.

LoRA adapters are merged per tensor as peft's merge_and_unload merges them (W += scaling * B @ A for each active,
not yet merged adapter, fan_in_fan_out honoured, lora_bias added to the bias), into a new tensor: the model is
never changed. Modules in modules_to_save contribute their trained copy. Other adapter kinds are refused.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import gguf
import torch

from ..arch.registry import adapter_for
from ..errors import InputError
from .checkpoint import TORCH_DTYPE_NAMES
from .model import SourceModel, TensorSpec, check_config, config_errors, specs_from_records

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Loader = Callable[[], torch.Tensor]
# where an offloaded module's weights live: (its name prefix, accelerate's weights_map)
Offload = Optional[tuple[str, Any]]


@dataclass(frozen=True)
class LiveTensor:
    """One tensor of a model in memory, named as save_pretrained names it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Loader


@dataclass
class _Found:
    name: str
    tensor: torch.Tensor    # the Parameter or buffer itself (meta when offloaded): tied weights are one object
    load: Loader
    merged: bool = False    # LoRA deltas are added when loaded


def open_live(model: Any, tokenizer: Optional[PreTrainedTokenizerBase | str | Path] = None, *,
              name: Optional[str] = None) -> SourceModel:
    """A SourceModel over a transformers PreTrainedModel (or peft PeftModel) in memory, on any devices.

    tokenizer: a transformers tokenizer, or a folder holding one; needed only to write a file (analysis and
    planning read none). name: general.name of the output (default: the last part of the model's name_or_path).
    """
    base = transformers_model(model)
    config = saved_config(base)
    check_config(config)
    with config_errors():
        adapter = adapter_for(config)
    tensors = live_tensors(model)
    records = []
    for tensor in tensors.values():
        dtype = TORCH_DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise InputError(f"tensor '{tensor.name}' has dtype {tensor.dtype}; only float models can be converted")
        records.append((tensor.name, dtype, tensor.shape))
    specs, extra = specs_from_records(adapter, records)
    generation = generation_config(base)

    def load_source(spec: TensorSpec) -> torch.Tensor:
        return tensors[spec.source].load()

    def add_tokenizer(writer: gguf.GGUFWriter) -> None:
        from .tokenizer import add_tokenizer as add_folder_tokenizer, add_tokenizer_from_hf

        if tokenizer is None:
            raise InputError("no tokenizer given: a GGUF file needs the model's vocabulary")
        if isinstance(tokenizer, (str, Path)):
            add_folder_tokenizer(writer, Path(tokenizer), config)
        else:
            add_tokenizer_from_hf(writer, tokenizer, config, generation)

    return SourceModel(config, adapter, specs, load_source, extra, add_tokenizer, name=name or model_name(base))


def is_peft_model(model: Any) -> bool:
    """Whether `model` comes from peft (a PeftModel or one of its tuner models), judged without importing peft."""
    return type(model).__module__.split(".")[0] == "peft"


def transformers_model(model: Any) -> PreTrainedModel:
    """The transformers model under `model`: peft's base model of a PeftModel, torch.compile's original module."""
    model = getattr(model, "_orig_mod", model)
    if is_peft_model(model):
        _import_peft()      # reading its adapters needs peft: say how to install it, if it is missing
        if not hasattr(model, "get_base_model"):
            raise InputError(f"{type(model).__name__}: pass the PeftModel itself (get_peft_model's result)")
        for adapter_name, adapter_config in getattr(model, "peft_config", {}).items():
            peft_type = str(getattr(adapter_config.peft_type, "value", adapter_config.peft_type))
            if peft_type != "LORA":
                raise InputError(f"adapter '{adapter_name}' is {peft_type}; only LoRA adapters can be merged on "
                                 "export (call merge_and_unload() on a copy and export that)")
        model = model.get_base_model()
    if not hasattr(model, "config") or not hasattr(model.config, "to_json_string"):
        raise InputError(f"{type(model).__name__} is not a transformers model (PreTrainedModel)")
    return model


def saved_config(model: PreTrainedModel) -> dict[str, Any]:
    """What save_pretrained would write as config.json: the config's non-default values and the class name."""
    config = json.loads(model.config.to_json_string(use_diff=True))
    config["architectures"] = [type(model).__name__]
    return config


def generation_config(model: PreTrainedModel) -> dict[str, Any]:
    """What save_pretrained would write as generation_config.json (bos/eos ids the tokenizer metadata may use)."""
    generation = getattr(model, "generation_config", None)
    if generation is None or not (hasattr(model, "can_generate") and model.can_generate()):
        return {}
    return generation.to_diff_dict()


def model_name(model: PreTrainedModel) -> str:
    name_or_path = str(getattr(model.config, "name_or_path", "") or "")
    return Path(name_or_path).name or str(getattr(model.config, "model_type", "") or type(model).__name__)


def model_device(model: Any) -> Optional[torch.device]:
    """The GPU holding most of the model's parameters, or None for a model on the CPU (or offloaded)."""
    counts: Counter[torch.device] = Counter()
    for parameter in transformers_model(model).parameters():
        if parameter.device.type not in ("cpu", "meta"):
            counts[parameter.device] += parameter.numel()
    return counts.most_common(1)[0][0] if counts else None


def live_tensors(model: Any) -> dict[str, LiveTensor]:
    """The tensors save_pretrained would write for `model` (LoRA merged), by name, each with a loader."""
    base = transformers_model(model)
    peft = _import_peft() if is_peft_model(model) or _holds_peft_layers(base) else None
    found: list[_Found] = []
    _walk(base, "", None, peft, found, None)
    ignored = set(getattr(base, "_keys_to_ignore_on_save", None) or ())
    found = [item for item in found if item.name not in ignored]
    groups: dict[int, list[_Found]] = {}
    for item in found:
        groups.setdefault(id(item.tensor), []).append(item)
    output_name = _output_embedding_name(base)
    tensors = {}
    for group in groups.values():
        kept = [item for item in group if item.name != output_name] if len(group) > 1 else group
        if len(kept) > 1:
            raise InputError(f"tensors {[item.name for item in kept]} are one tensor under several names; "
                             "save_pretrained cannot save this model either")
        merged = [item for item in group if item.merged]
        if len(merged) > 1:
            raise InputError(f"tied tensors {[item.name for item in merged]} each have a LoRA adapter; merge_and_unload "
                             "would add both to the one weight (call it on a copy and export that)")
        # a LoRA delta on one name of a tied weight changes the one Parameter, so every name sees it
        load = merged[0].load if merged else kept[0].load
        tensor = kept[0].tensor
        tensors[kept[0].name] = LiveTensor(kept[0].name, tensor.dtype, tuple(tensor.shape), load)
    return tensors


def _walk(module: torch.nn.Module, prefix: str, offload: Offload, peft: Any, found: list[_Found],
          lora: Optional[torch.nn.Module]) -> None:
    """Collect module's parameters and persistent buffers as state_dict() names them; `lora`: the LoRA layer whose
    deltas go into this (base) module's weight and bias."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "weights_map", None) is not None:
        offload = (prefix, hook.weights_map)
    if peft is not None and _is_peft_module(module):
        if isinstance(module, peft.ModulesToSaveWrapper):
            chosen = (module.modules_to_save[module.active_adapters[0]] if module.active_adapters
                      else module.original_module)
            _walk(chosen, prefix, offload, peft, found, None)
            return
        if isinstance(module, (peft.LoraLinear, peft.LoraEmbedding)):
            _walk(module.get_base_layer(), prefix, offload, peft, found, module)
            return
        raise InputError(f"module '{prefix.rstrip('.')}' is a {type(module).__name__} from peft; only LoRA on "
                         "Linear and Embedding layers and modules_to_save can be merged on export (call "
                         "merge_and_unload() on a copy and export that)")
    adapters = _adapters_to_merge(lora, prefix) if lora is not None else []
    with_bias = [adapter for adapter in adapters if getattr(lora, "lora_bias", {}).get(adapter)]   # peft >= 0.14
    if module._parameters.get("bias") is None and with_bias:
        raise InputError(f"'{prefix.rstrip('.')}' has a LoRA adapter with lora_bias but no bias to merge it into")
    persistent = [(name, buffer) for name, buffer in module._buffers.items()
                  if buffer is not None and name not in module._non_persistent_buffers_set]
    for local, tensor in [*((name, p) for name, p in module._parameters.items() if p is not None), *persistent]:
        name = prefix + local
        load = _loader(name, tensor, offload)
        merging = [adapter for adapter in adapters
                   if local == "weight" or (local == "bias" and adapter in with_bias)]
        if merging:
            load = _merging_loader(load, lora, local, merging, isinstance(lora, peft.LoraEmbedding))
        found.append(_Found(name, tensor, load, merged=bool(merging)))
    for child_name, child in module._modules.items():
        if child is not None and lora is None:
            _walk(child, f"{prefix}{child_name}.", offload, peft, found, None)


def _loader(name: str, tensor: torch.Tensor, offload: Offload) -> Loader:
    if tensor.device.type != "meta":
        return tensor.detach
    if offload is None:
        raise InputError(f"tensor '{name}' has no data (it is on the meta device and no accelerate hook holds it)")
    offload_prefix, weights_map = offload
    key = name[len(offload_prefix):]

    def load_offloaded() -> torch.Tensor:
        return weights_map[key]

    return load_offloaded


def _adapters_to_merge(lora: torch.nn.Module, prefix: str) -> list[str]:
    """The adapters merge_and_unload would merge into this layer: active ones not merged already."""
    adapters = [adapter for adapter in lora.active_adapters
                if adapter not in lora.merged_adapters and (adapter in lora.lora_A or adapter in lora.lora_embedding_A)]
    variants = [adapter for adapter in adapters
                if adapter in getattr(lora, "lora_variant", {}) or getattr(lora, "use_dora", {}).get(adapter)]
    if variants:
        raise InputError(f"'{prefix.rstrip('.')}' has LoRA variant adapters {variants} (DoRA or similar); only plain "
                         "LoRA is merged on export (call merge_and_unload() on a copy and export that)")
    return adapters


def _merging_loader(load: Loader, lora: Any, local: str, adapters: list[str], embedding: bool) -> Loader:
    """Adds the deltas as peft's (unsafe, default) merge does, rounding included: in place into the weight's dtype;
    a Linear adds the delta as computed (float32 adapters onto a bf16 weight add in float32), an Embedding first
    casts the delta to the weight's dtype."""
    def load_merged() -> torch.Tensor:
        with torch.no_grad():
            merged = load().clone()
            for adapter in adapters:
                if local == "bias":
                    merged += lora.lora_B[adapter].bias * lora.scaling[adapter]
                elif embedding:
                    merged += lora.get_delta_weight(adapter).to(merged.dtype)
                else:
                    merged += lora.get_delta_weight(adapter)
        return merged

    return load_merged


def _output_embedding_name(model: PreTrainedModel) -> Optional[str]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None:
        return None
    for name, module in model.named_modules():
        if module is output:
            return f"{name}.weight" if name else "weight"
    return None


def _is_peft_module(module: torch.nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "peft"


def _holds_peft_layers(model: torch.nn.Module) -> bool:
    """A transformers model with adapters added through its own PEFT integration (add_adapter / load_adapter)."""
    return any(_is_peft_module(module) for module in model.modules())


class _Peft:
    """The few peft classes the walk tells apart."""

    def __init__(self) -> None:
        from peft.tuners.lora import Embedding, Linear
        from peft.utils.other import ModulesToSaveWrapper

        self.LoraLinear = Linear
        self.LoraEmbedding = Embedding
        self.ModulesToSaveWrapper = ModulesToSaveWrapper


def _import_peft() -> _Peft:
    try:
        return _Peft()
    except ImportError as exc:
        raise InputError(f"this model has PEFT adapters, and merging them needs peft ({exc}); install it with "
                         "`pip install 'ewq-gguf[peft]'`") from exc
