"""ewq-gguf: Hugging Face checkpoints to mixed-precision GGUF files, planned from measurements.

    import ewq_gguf
    result = ewq_gguf.convert("model-dir", "out.gguf", method="ewq")       # a checkpoint folder
    result = ewq_gguf.export(model, tokenizer, "out.gguf", type="Q8_0")     # a transformers / PEFT model in memory
    analysis = ewq_gguf.analyze("model-dir")                               # or a model in memory
    plan = ewq_gguf.plan(model, "ewq", analysis=analysis)                  # decide types, write nothing
    report = ewq_gguf.perplexity("out.gguf")                               # through llama.cpp

Nothing here prints; progress bars (tqdm, stderr) go away with progress=False, and every error a user can cause is
an EwqGgufError: InputError (UnsupportedArchitectureError) or OutputError.

`ewq_gguf.plan` is the function above; the package of planners stays importable as `from ewq_gguf.plan import ...`.
"""
__version__ = "0.1.0"

import importlib

from .errors import EwqGgufError, InputError, OutputError, UnsupportedArchitectureError
# Loading the (light) planners' package now binds `ewq_gguf.plan` to it once; a later import of it would rebind the
# name over the function `plan`, so the name is freed below and served by __getattr__.
from .plan import Plan, PlanEntry

# Everything else loads on first use: a command such as `ewq-gguf perplexity` or `inspect` never needs torch or
# transformers, whose import alone costs seconds.
_LAZY_EXPORTS = {
    "Analysis": "analyse",
    "CompareReport": "validate",
    "ConvertResult": "api",
    "PerplexityReport": "validate",
    "analyze": "live_api",
    "compare": "validate",
    "convert": "api",
    "export": "live_api",
    "perplexity": "validate",
    "plan": "live_api",
}
del plan


def __getattr__(name: str):
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Analysis",
    "CompareReport",
    "ConvertResult",
    "EwqGgufError",
    "InputError",
    "OutputError",
    "PerplexityReport",
    "Plan",
    "PlanEntry",
    "UnsupportedArchitectureError",
    "__version__",
    "analyze",
    "compare",
    "convert",
    "export",
    "perplexity",
    "plan",
]
