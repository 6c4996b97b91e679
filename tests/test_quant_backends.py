"""quantize()'s backends: the native encoders and ggml's (through ctypes), each on a thread pool, and the choice
between them and the torch codecs. Their bytes against ggml's, type by type, are test_quant_parity's."""
from __future__ import annotations

import ctypes

import pytest
import torch

from ewq_gguf.errors import EwqGgufError
from ewq_gguf.quant import CODECS, QType, ggml_backend, native_backend, quantize
from testkit import resources

from quant_inputs import make_importance, make_rows
from quant_reference import assert_same_bytes, requires_ggml

pytestmark = requires_ggml

# 37 rows of 512: no thread count divides them evenly, so the pieces differ in size
N_ROWS, N_PER_ROW = 37, 512


@pytest.mark.parametrize("qtype", sorted(CODECS, key=lambda t: t.name), ids=lambda t: t.name)
@pytest.mark.parametrize("with_importance", [False, True])
def test_auto_on_cpu_gives_the_torch_bytes(qtype, with_importance):
    rows = make_rows("student_t3", N_ROWS, N_PER_ROW, seed=21)
    importance = make_importance(N_PER_ROW, seed=21, with_zeros=True) if with_importance else None
    assert_same_bytes(quantize(rows, qtype, importance, backend="auto"),
                      quantize(rows, qtype, importance, backend="torch"))


def test_native_encoders_are_built():
    """pip install -e . compiles them (setup.py): CI's install must have, or every native case would go untested."""
    if not native_backend.available():
        resources.missing("the native encoders are not built (pip install -e . compiles ewq_gguf.quant._native)")
    assert native_backend.ISAS[-1] == "baseline" and {QType.Q4_K, QType.Q5_K, QType.Q6_K} <= native_backend.TYPES


def _native_types():
    return sorted(native_backend.TYPES, key=lambda t: t.name)


@pytest.mark.parametrize("backend, qtypes", [("ggml", (QType.Q4_K, QType.IQ4_XS, QType.Q5_0)),
                                             ("native", _native_types())])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_thread_count_does_not_change_bytes(backend, qtypes, threads):
    rows = make_rows("real_bf16", N_ROWS, N_PER_ROW).to(torch.bfloat16)
    importance = make_importance(N_PER_ROW)
    for qtype in qtypes:
        assert_same_bytes(quantize(rows, qtype, importance, backend=backend, threads=threads),
                          quantize(rows, qtype, importance, backend="torch"))


def _record_calls(monkeypatch, module) -> list:
    calls = []
    real_quantize = module.quantize

    def recording_quantize(*args, **kwargs):
        calls.append(args[1])
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(module, "quantize", recording_quantize)
    return calls


def test_auto_takes_native_then_ggml_on_cpu_and_torch_elsewhere(monkeypatch):
    native_calls, ggml_calls = _record_calls(monkeypatch, native_backend), _record_calls(monkeypatch, ggml_backend)
    rows = make_rows("gaussian", 4, 256)
    quantize(rows, QType.Q6_K)
    quantize(rows, QType.MXFP4)  # no native encoder
    quantize(rows, QType.Q6_K, backend="torch")
    quantize(rows, QType.F16)  # float types are casts, in torch whatever the backend
    if native_backend.available():
        assert native_calls == [QType.Q6_K] and ggml_calls == [QType.MXFP4]
    else:
        assert native_calls == [] and ggml_calls == [QType.Q6_K, QType.MXFP4]


def test_auto_takes_ggml_where_the_native_encoders_are_not_built(monkeypatch):
    ggml_calls = _record_calls(monkeypatch, ggml_backend)
    monkeypatch.setattr(native_backend, "_native", None)
    rows = make_rows("gaussian", 4, 256)
    assert_same_bytes(quantize(rows, QType.Q4_K), quantize(rows, QType.Q4_K, backend="torch"))
    assert ggml_calls == [QType.Q4_K]
    with pytest.raises(EwqGgufError, match="native quantizer is not built"):
        quantize(rows, QType.Q4_K, backend="native")


def test_native_backend_refuses_types_it_does_not_encode():
    with pytest.raises(ValueError, match="does not encode MXFP4"):
        native_backend.quantize(torch.zeros(1, 32), QType.MXFP4)


@pytest.mark.parametrize("backend", ["ggml", "native"])
def test_cpu_backends_refuse_other_devices(backend):
    rows = torch.empty((2, 256), device="meta")
    with pytest.raises(EwqGgufError, match="CPU"):
        quantize(rows, QType.Q4_K, backend=backend)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="auto, torch, native, ggml"):
        quantize(torch.zeros(1, 32), QType.Q8_0, backend="numpy")


@pytest.mark.parametrize("backend", ["ggml", "native"])
def test_no_rows(backend):
    data = quantize(torch.zeros(0, 256), QType.Q4_K, backend=backend, threads=4)
    assert data.shape == (0, 144) and data.dtype == torch.uint8


# struct ggml_type_traits as this module reads it, with one change each: what a llama-cpp-python whose ggml.h
# differs from the one it was copied from would look like
_FIELDS = dict(ggml_backend._TypeTraits._fields_)
OTHER_LAYOUTS = {
    # the struct before ggml added blck_size_interleave: type_size and everything after it shift
    "without blck_size_interleave": [(name, kind) for name, kind in _FIELDS.items() if name != "blck_size_interleave"],
    # the two function pointers in the other order: to_float would be the encoder
    "to_float and from_float_ref swapped": [(name, _FIELDS[name]) for name in (
        "type_name", "blck_size", "blck_size_interleave", "type_size", "is_quantized", "from_float_ref", "to_float")],
}


@pytest.fixture
def fresh_ggml(monkeypatch):
    """The library loaded anew by the test, and again after it (after monkeypatch undoes its changes)."""
    ggml_backend._library.cache_clear()
    ggml_backend.available.cache_clear()
    yield
    ggml_backend._library.cache_clear()
    ggml_backend.available.cache_clear()


def test_the_installed_library_passes_the_layout_check(fresh_ggml):
    assert ggml_backend._layout_problem(ggml_backend._library()) is None


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_a_library_laid_out_otherwise_is_refused(monkeypatch, fresh_ggml, layout):
    monkeypatch.setattr(ggml_backend, "_TypeTraits", type("Traits", (ctypes.Structure,),
                                                          {"_fields_": OTHER_LAYOUTS[layout]}))
    with pytest.raises(EwqGgufError, match=r"^the ggml quantizer is unavailable: ewq-gguf does not read the "
                                           r"libggml-base of llama-cpp-python \S+ right \(.+\)$"):
        ggml_backend._library()
    assert not ggml_backend.available()
    rows = make_rows("gaussian", 4, 256)
    with pytest.raises(EwqGgufError, match="the ggml quantizer is unavailable"):
        quantize(rows, QType.Q4_K, backend="ggml")
    # auto falls back to our encoders, which give the same bytes
    assert_same_bytes(quantize(rows, QType.Q4_K), quantize(rows, QType.Q4_K, backend="torch"))
