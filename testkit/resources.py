"""The one place tests find what they do not make themselves: the development model and llama.cpp's tools (and,
through missing(), the native encoders that the install compiles).

Absent, they skip a test on a developer's machine; under CI=true they fail it, because CI (scripts/run_tests.sh) makes
them all, and a test that skips there would hide exactly the claim it checks.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ewq_gguf import devenv, llamacpp

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str):
    """Skip the calling test, or fail it under CI, for something CI makes."""
    if IN_CI:
        pytest.fail(f"{message} (CI makes it: scripts/run_tests.sh)", pytrace=False)
    pytest.skip(message)


def dev_model(name: str = "smollm2") -> Path:
    """A development model's folder (bf16 safetensors, config, tokenizer)."""
    folder = devenv.dev_model(name)
    if not (folder / "model.safetensors").is_file():
        missing(f"development model {name} not present at {folder} (python -m scripts.setup.make_dev_model "
                 f"{folder} --model {name}, or set EWQ_DEV_MODELS)")
    return folder


def llama_tool(name: str) -> Path:
    """A built llama.cpp tool such as llama-quantize."""
    path = llamacpp.tool(name)
    if path is None:
        missing(f"{name} not built in {llamacpp.bin_dir()} (bash vendor/build_llama_tools.sh, or set EWQ_LLAMA_BIN)")
    return path
