"""Running llama.cpp's own tools, and any other command, measured, for benchmark scripts.

Where the tools are is ewq_gguf.llamacpp's business (`python -m ewq_gguf.llamacpp` prints it):
`llamacpp.tool("llama-quantize")` and `llamacpp.converter_script()` give a path, or None until
vendor/build_llama_tools.sh has run. This module only runs them:

    run_measured(cmd)             -> MeasuredRun   (wall time and peak RSS of any command, e.g. llama-quantize)
    run_convert(model_dir, out)   -> MeasuredRun   (the same for llama.cpp's convert_hf_to_gguf.py)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ewq_gguf import llamacpp


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
    """Convert a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py (outtype: f32, f16, bf16, q8_0, ...),
    importing the gguf-py that ships with it (newer than, and preferred to, the installed gguf)."""
    script, gguf_py = llamacpp.converter_script(), llamacpp.gguf_py_dir()
    if script is None or gguf_py is None:
        raise FileNotFoundError("convert_hf_to_gguf.py not found: run vendor/build_llama_tools.sh first")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_py), env.get("PYTHONPATH")]))
    cmd = [python, script, model_dir, "--outtype", outtype, "--outfile", outfile, *extra_args]
    return run_measured(cmd, env=env)
