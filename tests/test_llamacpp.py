"""Where the pinned llama.cpp and the development models are found: environment variables over per-user defaults."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from ewq_gguf import devenv, llamacpp
from ewq_gguf.errors import InputError


@pytest.fixture
def clean_environment(monkeypatch):
    for name in ("EWQ_GGUF_CACHE", "EWQ_LLAMA_CPP", "EWQ_LLAMA_BIN", "EWQ_DEV_MODELS", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_pinned_version_is_the_installed_binding():
    assert llamacpp.pinned_version() == version("llama-cpp-python")


def test_cache_and_tools_follow_the_environment(clean_environment, tmp_path):
    monkeypatch = clean_environment
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert llamacpp.cache_dir() == tmp_path / "home" / ".cache" / "ewq-gguf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llamacpp.cache_dir() == tmp_path / "xdg" / "ewq-gguf"
    monkeypatch.setenv("EWQ_GGUF_CACHE", str(tmp_path / "own"))
    assert llamacpp.bin_dir() == tmp_path / "own" / "llama.cpp" / llamacpp.pinned_version() / "bin"
    assert llamacpp.tool("llama-quantize") is None and llamacpp.source_dir() is None
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "llama-quantize").write_text("#!/bin/sh\n")
    (tools / "llama-quantize").chmod(0o755)
    monkeypatch.setenv("EWQ_LLAMA_BIN", str(tools))
    assert llamacpp.tool("llama-quantize") == tools / "llama-quantize"
    assert llamacpp.tool("llama-imatrix") is None


def test_a_users_own_tree_is_checked(clean_environment, tmp_path):
    monkeypatch = clean_environment
    monkeypatch.setenv("EWQ_LLAMA_CPP", str(tmp_path))
    with pytest.raises(InputError, match="not a llama.cpp tree"):
        llamacpp.source_dir()
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    (tmp_path / "gguf-py").mkdir()
    assert llamacpp.source_dir() == tmp_path
    assert llamacpp.converter_script() == tmp_path / "convert_hf_to_gguf.py"
    assert llamacpp.gguf_py_dir() == tmp_path / "gguf-py"


def test_env_lines_are_shell_sourceable(clean_environment, tmp_path):
    """What vendor/build_llama_tools.sh reads: KEY='value' lines that a shell evaluates back to the same paths."""
    environment = {**os.environ, "EWQ_GGUF_CACHE": str(tmp_path / "it's here")}
    printed = subprocess.run([sys.executable, "-m", "ewq_gguf.llamacpp", "env"], capture_output=True, text=True,
                             env=environment, check=True).stdout
    echoed = subprocess.run(["bash", "-c", printed + '\necho "$LLAMA_BIN_DIR"'], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert echoed == str(tmp_path / "it's here" / "llama.cpp" / llamacpp.pinned_version() / "bin")


def test_dev_models_default_to_the_repository(clean_environment, tmp_path):
    assert devenv.dev_model("qwen25") == devenv.REPOSITORY / "models" / "qwen25"
    clean_environment.setenv("EWQ_DEV_MODELS", str(tmp_path))
    assert devenv.dev_model() == tmp_path / "smollm2"
    with pytest.raises(ValueError, match="unknown development model"):
        devenv.dev_model("llama-70b")
