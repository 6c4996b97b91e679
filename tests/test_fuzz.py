"""Fuzzing the inputs a downloaded checkpoint controls: safetensors headers and config.json values.

Whatever hypothesis makes of them, `ewq-gguf convert` either writes a GGUF that reads back and matches its plan, or
exits non-zero with one `error:` line and no traceback, leaving no file behind; and it does so promptly (a watchdog
fails the example that runs too long). Bounded to a few dozen examples each so the file runs in seconds.
"""
from __future__ import annotations

import json
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import gguf
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open

from ewq_gguf.constants import KEY_EWQ_PLAN
from ewq_gguf.plan import Plan
from ewq_gguf.write import verify
from test_convert import run_cli
from test_robustness import rewrite_safetensors

pytestmark = pytest.mark.filterwarnings("ignore::ewq_gguf.source.tokenizer.TokenizerWarning")

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
WATCHDOG_SECONDS = 60

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so that no `except Exception` on the way can swallow it."""


@contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"convert was still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def convert_and_judge(model: Path, out_dir: Path) -> None:
    """The contract: a valid file, or a clean one-line refusal with nothing written."""
    out = out_dir / "m.gguf"
    with watchdog(WATCHDOG_SECONDS):
        result = run_cli("convert", model, out, "--type", "F16", "--quiet")
    if result.returncode == 0:
        reader = gguf.GGUFReader(out)
        verify(out, Plan.from_dict(json.loads(reader.fields[KEY_EWQ_PLAN].contents())))
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert list(out_dir.iterdir()) == [], result.stderr


@contextmanager
def scratch_copy(model: Path) -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory(prefix="ewq-fuzz-") as scratch:
        copy = Path(shutil.copytree(model, Path(scratch) / "model"))
        out_dir = Path(scratch) / "out"
        out_dir.mkdir()
        yield copy, out_dir


# --- config.json -------------------------------------------------------------------------------------------------

# keys the adapters read beyond those a saved Llama config has
EXTRA_CONFIG_KEYS = ["head_dim", "n_layer", "n_ctx", "rope_scaling", "rope_parameters", "rope_theta",
                     "partial_rotary_factor", "sliding_window", "layer_types", "text_config"]


@st.composite
def config_edits(draw, config: dict[str, Any]) -> list[tuple[str, Any]]:
    keys = sorted(config) + EXTRA_CONFIG_KEYS
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        original = config.get(key)
        nearby = st.integers(-2, 2).map(lambda step: original + step) if type(original) is int else st.nothing()
        edits.append((key, draw(st.just(None) | nearby | json_values | st.just("<delete>"))))
    return edits


def test_fuzz_config_values(tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())

    @FUZZ
    @given(edits=config_edits(config))
    def check(edits: list[tuple[str, Any]]) -> None:
        with scratch_copy(tiny_llama) as (model, out_dir):
            edited = dict(config)
            for key, value in edits:
                if value == "<delete>":
                    edited.pop(key, None)
                else:
                    edited[key] = value
            (model / "config.json").write_text(json.dumps(edited))
            convert_and_judge(model, out_dir)

    check()


# --- safetensors headers -----------------------------------------------------------------------------------------

dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "BOOL", "F8_E4M3", "", "f32"])
shapes = st.lists(st.integers(-1, 600) | st.integers(0, 2**64), max_size=5)
offsets = st.lists(st.integers(-10, 7_000_000) | st.integers(-2**64, 2**64), min_size=0, max_size=3)


@st.composite
def header_edits(draw, names: list[str]) -> list[tuple[str, ...]]:
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "delete", "rename", "length",
                                     "byte"]))
        if kind == "dtype":
            edits.append((kind, name, draw(dtypes | json_values)))
        elif kind == "shape":
            edits.append((kind, name, draw(shapes | json_values)))
        elif kind == "data_offsets":
            edits.append((kind, name, draw(offsets | json_values)))
        elif kind == "entry":
            edits.append((kind, name, draw(json_values)))
        elif kind == "rename":
            edits.append((kind, name, draw(st.text(max_size=40) | st.sampled_from(names))))
        elif kind == "length":
            edits.append((kind, name, draw(st.integers(0, 2**64 - 1) | st.integers(0, 20_000))))
        elif kind == "byte":
            edits.append((kind, name, draw(st.integers(0, 4000)), draw(st.integers(0, 255))))
        else:
            edits.append((kind, name))
    return edits


def apply_header_edits(path: Path, edits: list[tuple[str, ...]]) -> None:
    declared = None

    def edit(header: dict) -> None:
        nonlocal declared
        for kind, name, *values in edits:
            if kind == "length":
                declared = values[0]
            elif kind == "delete":
                header.pop(name, None)
            elif kind == "rename" and name in header:
                header[values[0]] = header.pop(name)
            elif kind == "entry":
                header[name] = values[0]
            elif kind in ("dtype", "shape", "data_offsets") and isinstance(header.get(name), dict):
                header[name][kind] = values[0]

    rewrite_safetensors(path, edit)
    byte_flips = [values for kind, _, *values in edits if kind == "byte"]
    if byte_flips or declared is not None:
        data = bytearray(path.read_bytes())
        for position, value in byte_flips:
            data[8 + position % max(1, int.from_bytes(data[:8], "little"))] = value
        if declared is not None:
            data[:8] = declared.to_bytes(8, "little")
        path.write_bytes(bytes(data))


def test_fuzz_safetensors_header(tiny_llama):
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as handle:
        names = sorted(handle.keys())

    @FUZZ
    @given(edits=header_edits(names))
    def check(edits: list[tuple[str, ...]]) -> None:
        with scratch_copy(tiny_llama) as (model, out_dir):
            apply_header_edits(model / "model.safetensors", edits)
            convert_and_judge(model, out_dir)

    check()
