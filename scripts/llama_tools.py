"""Locating and running llama.cpp's own tools, built by vendor/build_llama_tools.sh, for benchmark scripts.

    tool_path("llama-quantize")   -> Path | None   (None until the build script has run)
    convert_script()              -> Path | None   (llama.cpp's convert_hf_to_gguf.py from the same sdist)
    run_convert(model_dir, out)   -> MeasuredRun   (wall time and peak RSS of the conversion)
    run_measured(cmd)             -> MeasuredRun   (the same measurement for any command, e.g. llama-quantize)

`python scripts/llama_tools.py` prints where everything is.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO_DIR / "vendor" / "build"
PATHS_FILE = BUILD_DIR / "paths.env"
TOOL_NAMES = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split")


def _build_paths() -> dict[str, str]:
    """KEY=VALUE pairs of vendor/build/paths.env, empty when the build script has not run."""
    if not PATHS_FILE.is_file():
        return {}
    pairs = {}
    for line in PATHS_FILE.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            pairs[key.strip()] = value.strip()
    return pairs


def _existing(path: str | None) -> Path | None:
    return Path(path) if path and Path(path).exists() else None


def tool_path(name: str) -> Path | None:
    """Path of a built llama.cpp tool (e.g. "llama-quantize"), or None if it has not been built."""
    bin_dir = _build_paths().get("LLAMA_BIN_DIR", str(BUILD_DIR / "bin"))
    candidate = Path(bin_dir) / name
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def convert_script() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py from the vendored sdist, or None if it is not extracted."""
    return _existing(_build_paths().get("LLAMA_CONVERT_HF"))


def gguf_py_dir() -> Path | None:
    """The gguf-py package that ships with convert_hf_to_gguf.py (newer than, and preferred to, the installed gguf)."""
    return _existing(_build_paths().get("LLAMA_GGUF_PY"))


@dataclass(frozen=True)
class MeasuredRun:
    wall_s: float
    peak_rss_mib: float  # the process's own peak resident set (ru_maxrss from wait4), not the whole machine's
    output: str  # stdout and stderr, interleaved


def run_measured(cmd: list[str | Path], env: dict[str, str] | None = None) -> MeasuredRun:
    """Run a command to completion and measure it; raises CalledProcessError (with its output) when it fails.

    Peak RSS comes from wait4 on this one child rather than getrusage(RUSAGE_CHILDREN), which would report
    the maximum over every child this Python process has ever waited for.
    """
    args = [str(part) for part in cmd]
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall_s = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        log.seek(0)
        output = log.read().decode(errors="replace")
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, args, output=output)
    return MeasuredRun(wall_s=wall_s, peak_rss_mib=usage.ru_maxrss / 1024, output=output)


def run_convert(model_dir: Path, outfile: Path, outtype: str = "f32", extra_args: tuple[str, ...] = (),
                python: str = sys.executable) -> MeasuredRun:
    """Convert a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py (outtype: f32, f16, bf16, q8_0, ...)."""
    script, gguf_py = convert_script(), gguf_py_dir()
    if script is None or gguf_py is None:
        raise FileNotFoundError("convert_hf_to_gguf.py not found: run vendor/build_llama_tools.sh first")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_py), env.get("PYTHONPATH")]))
    cmd = [python, script, model_dir, "--outtype", outtype, "--outfile", outfile, *extra_args]
    return run_measured(cmd, env=env)


def main() -> None:
    for name in TOOL_NAMES:
        print(f"{name:17} {tool_path(name) or 'not built (run vendor/build_llama_tools.sh)'}")
    print(f"{'convert script':17} {convert_script() or 'not extracted'}")
    print(f"{'gguf-py':17} {gguf_py_dir() or 'not extracted'}")


if __name__ == "__main__":
    main()
