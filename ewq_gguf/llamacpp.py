"""The llama.cpp that validates our files: its source tree and its command-line tools, and where they live.

ewq-gguf measures its files through llama-cpp-python, so the llama.cpp it trusts is the one that binding was built
from: the tree vendored in the llama-cpp-python sdist of the installed version. That tree holds
`convert_hf_to_gguf.py` (with its `conversion/` package), `gguf-py/`, and the sources of `llama-quantize`,
`llama-perplexity`, `llama-imatrix` and `llama-gguf-split`. This module is the one home of where those live:

    EWQ_GGUF_CACHE    per-user cache (default $XDG_CACHE_HOME/ewq-gguf, else ~/.cache/ewq-gguf)
    EWQ_LLAMA_CPP     a llama.cpp tree of the user's own (a checkout); default: the pinned sdist's tree, fetched once
                      with pip into <cache>/llama.cpp/<version>/src and used offline afterwards
    EWQ_LLAMA_BIN     a folder holding the tools; default <cache>/llama.cpp/<version>/bin, built by
                      vendor/build_llama_tools.sh

`python -m ewq_gguf.llamacpp env [--fetch]` prints these as shell-sourceable KEY=value lines (what the build script
reads); `python -m ewq_gguf.llamacpp` prints where everything is.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from .errors import InputError

TOOL_NAMES = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split")
PACKAGE = "llama-cpp-python"


def pinned_version() -> str:
    """The installed llama-cpp-python's version: the llama.cpp commit whose source and tools we use."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        raise InputError(f"{PACKAGE} is not installed: pip install {PACKAGE}") from None


def cache_dir() -> Path:
    """The per-user cache of ewq-gguf (fetched sources, built tools)."""
    if os.environ.get("EWQ_GGUF_CACHE"):
        return Path(os.environ["EWQ_GGUF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ewq-gguf"


def _pinned_dir() -> Path:
    return cache_dir() / "llama.cpp" / pinned_version()


def bin_dir() -> Path:
    """Where the tools are (or will be built): EWQ_LLAMA_BIN, else the cache folder of the pinned version."""
    if os.environ.get("EWQ_LLAMA_BIN"):
        return Path(os.environ["EWQ_LLAMA_BIN"]).expanduser()
    return _pinned_dir() / "bin"


def build_dir() -> Path:
    """The cmake build tree of the tools (kept, so that a rebuild only compiles what changed)."""
    return _pinned_dir() / "cmake"


def tool(name: str) -> Optional[Path]:
    """The path of a built llama.cpp tool such as "llama-quantize", or None when it is not built."""
    path = bin_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _is_tree(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py").is_dir()


def source_dir(fetch: bool = False) -> Optional[Path]:
    """The llama.cpp tree: EWQ_LLAMA_CPP if set, else the pinned sdist's (fetched first when `fetch`), else None."""
    if os.environ.get("EWQ_LLAMA_CPP"):
        own = Path(os.environ["EWQ_LLAMA_CPP"]).expanduser()
        if not _is_tree(own):
            raise InputError(f"EWQ_LLAMA_CPP={own} is not a llama.cpp tree (no convert_hf_to_gguf.py and gguf-py/)")
        return own
    tree = _pinned_dir() / "src"
    if _is_tree(tree):
        return tree
    return _fetch_pinned(tree) if fetch else None


def _fetch_pinned(tree: Path) -> Path:
    """Download the pinned sdist with pip (its cache makes this free after the binding's own build) and keep only
    the vendored llama.cpp tree, put in place by one rename so an interrupted fetch is never taken for a tree."""
    pinned = pinned_version()
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent) as work:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", work,
             f"{PACKAGE}=={pinned}"], capture_output=True, text=True)
        archives = sorted(Path(work).glob("*.tar.gz"))
        if download.returncode != 0 or not archives:
            last = (download.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise InputError(f"cannot fetch the {PACKAGE} {pinned} sdist (llama.cpp's source): {last}; "
                             f"set EWQ_LLAMA_CPP to a llama.cpp checkout instead")
        prefix = f"{archives[0].name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        extracted = Path(work) / "tree"
        with tarfile.open(archives[0]) as archive:
            members = []
            for member in archive.getmembers():
                if member.name.startswith(prefix) and (member.isfile() or member.isdir()):
                    member.name = member.name[len(prefix):]
                    members.append(member)
            archive.extractall(extracted, members=members, filter="data")
        if not _is_tree(extracted):
            raise InputError(f"the {PACKAGE} {pinned} sdist holds no llama.cpp tree")
        if _is_tree(tree):      # another process fetched it meanwhile
            return tree
        shutil.rmtree(tree, ignore_errors=True)
        extracted.rename(tree)
    return tree


def converter_script(fetch: bool = False) -> Optional[Path]:
    """llama.cpp's convert_hf_to_gguf.py of the tree above."""
    tree = source_dir(fetch)
    return tree / "convert_hf_to_gguf.py" if tree else None


def gguf_py_dir(fetch: bool = False) -> Optional[Path]:
    """The gguf-py package that ships with (and is required by) that convert_hf_to_gguf.py."""
    tree = source_dir(fetch)
    return tree / "gguf-py" if tree else None


def environment(fetch: bool = False) -> dict[str, str]:
    """Every location above as KEY -> path (empty where not present)."""
    tree = source_dir(fetch)
    pairs = {
        "LLAMA_CPP_PYTHON_VERSION": pinned_version(),
        "LLAMA_CPP_SRC": str(tree or ""),
        "LLAMA_BIN_DIR": str(bin_dir()),
        "LLAMA_BUILD_DIR": str(build_dir()),
        "LLAMA_CONVERT_HF": str(tree / "convert_hf_to_gguf.py") if tree else "",
        "LLAMA_GGUF_PY": str(tree / "gguf-py") if tree else "",
    }
    for name in TOOL_NAMES:
        pairs[name.upper().replace("-", "_")] = str(bin_dir() / name)
    return pairs


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        for key, value in environment(fetch="--fetch" in argv).items():
            print(f"{key}={_shell_quote(value)}")
        return 0
    if argv:
        print("usage: python -m ewq_gguf.llamacpp [env [--fetch]]", file=sys.stderr)
        return 2
    tree = source_dir()
    print(f"{PACKAGE:17} {pinned_version()}")
    print(f"{'llama.cpp tree':17} {tree or 'not fetched (python -m ewq_gguf.llamacpp env --fetch)'}")
    for name in TOOL_NAMES:
        print(f"{name:17} {tool(name) or 'not built (bash vendor/build_llama_tools.sh)'}")
    return 0


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except InputError as error:
        sys.exit(f"error: {error}")
