"""ewq_gguf.constants: data only (importing it loads nothing), and its tensor names are gguf-py's."""
from __future__ import annotations

import subprocess
import sys

import gguf

from ewq_gguf.constants import OUTPUT_HEAD, TOKEN_EMBEDDING


def test_tensor_names_are_gguf_py_names():
    assert TOKEN_EMBEDDING == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    assert OUTPUT_HEAD == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"


def test_importing_the_constants_loads_no_library():
    script = ("import sys, ewq_gguf; before = set(sys.modules); import ewq_gguf.constants\n"
              "loaded = sorted(set(sys.modules) - before - {'ewq_gguf.constants'})\n"
              "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", script], check=True)
