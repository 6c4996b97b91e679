"""Where the development models live, for tests and benchmark scripts: one environment variable with a
repository-relative default, so that no test or script names a folder of one machine.

    EWQ_DEV_MODELS   folder of development models, default <repository>/models; holds smollm2/ and qwen25/ as made by
                     `python -m scripts.setup.make_dev_model models/NAME --model NAME`

llama.cpp's source and tools are found by ewq_gguf.llamacpp.
"""
from __future__ import annotations

import os
from pathlib import Path

DEV_MODEL_NAMES = ("smollm2", "qwen25")
REPOSITORY = Path(__file__).resolve().parent.parent


def dev_models_dir() -> Path:
    return Path(os.environ.get("EWQ_DEV_MODELS") or REPOSITORY / "models").expanduser()


def dev_model(name: str = "smollm2") -> Path:
    """The folder of a development model (it may not exist yet: see make_dev_model.py)."""
    if name not in DEV_MODEL_NAMES:
        raise ValueError(f"unknown development model {name!r} (one of {', '.join(DEV_MODEL_NAMES)})")
    return dev_models_dir() / name
