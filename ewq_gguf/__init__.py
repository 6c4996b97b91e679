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

from .analyse import Analysis
from .api import ConvertResult, convert
from .errors import EwqGgufError, InputError, OutputError, UnsupportedArchitectureError
from .plan import Plan, PlanEntry
from .validate import CompareReport, PerplexityReport, compare, perplexity
from .live_api import analyze, export, plan  # last: the function `plan` takes the name the planners' package had

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
