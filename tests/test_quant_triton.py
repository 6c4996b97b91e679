"""The fused Triton kernels (ewq_gguf.quant.triton_kernels) give ggml's bytes.

triton is no dependency of ewq-gguf (the test extra installs it): each test is skipped without it. With a CUDA GPU the kernels run compiled, as
quantize() runs them; without one they run in Triton's interpreter on the CPU (TRITON_INTERPRET=1), on small
inputs. The interpreter computes in numpy and so cannot show an FMA contraction or an approximate division:
test_compiled_code_rounds_like_ggml compiles the kernels for sm_90 and reads the PTX.
The reference is ggml_quantize_chunk where llama-cpp-python is installed, else our torch codecs on the CPU (which
the other test_quant_* files prove equal to ggml).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Triton reads the switch when it defines a kernel, its own tl.sum and friends included: without a GPU the
# interpreter must be on before triton is first imported in this process
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
# else some module imported triton first (peft does, where triton is installed): test_kernels_in_a_fresh_process
# runs this file's kernel tests again in a process of their own
RUNS_KERNELS_HERE = CUDA or bool(os.environ.get("TRITON_INTERPRET"))
runs_kernels = pytest.mark.skipif(not RUNS_KERNELS_HERE, reason="triton was imported before the interpreter could "
                                  "be switched on: test_kernels_in_a_fresh_process runs this test")

from ewq_gguf import quant  # noqa: E402
from ewq_gguf.quant import QType, ggml_backend, quantize, row_nbytes  # noqa: E402

try:
    from ewq_gguf.quant import triton_kernels as kernels
    MISSING = ""
except ImportError as error:      # triton absent (the test extra installs it on Linux x86_64) or too old
    kernels, MISSING = None, str(error)

from quant_inputs import INPUT_CLASSES, far_outlier_rows, make_importance, make_rows, make_special_rows  # noqa: E402
from quant_reference import assert_same_bytes, reference_bytes  # noqa: E402

K_TYPES = (QType.Q4_K, QType.Q5_K)
CASES = [(QType.Q8_0, False)] + [(qtype, weighted) for qtype in K_TYPES for weighted in (False, True)]
# the interpreter's numpy warns about the divisions by zero that ggml also performs (and then discards)
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.skipif(kernels is None, reason=f"the fused kernels cannot load: {MISSING}")]


def _expected(rows: torch.Tensor, qtype: QType, importance) -> torch.Tensor:
    if ggml_backend.available():
        return reference_bytes(rows, qtype, importance)
    return quantize(rows, qtype, importance, backend="torch")


def _fused(rows: torch.Tensor, qtype: QType, importance) -> torch.Tensor:
    on_device = None if importance is None else importance.to(DEVICE)
    encoded = kernels.quantize(rows.to(DEVICE), qtype, on_device)
    assert encoded is not None, "the kernels refused finite input"
    return encoded


def _every_input_class(rows_per_class: int, n_per_row: int) -> torch.Tensor:
    """Rows of every input class of quant_inputs, then one more gaussian row, so that the last program of each
    kernel is only partly filled; several super-blocks per row exercise the importance vector's indexing."""
    parts = [make_rows(kind, rows_per_class, n_per_row, seed=index) for index, kind in enumerate(INPUT_CLASSES)]
    return torch.cat(parts + [make_rows("gaussian", 1, n_per_row, seed=99)])


@runs_kernels
@pytest.mark.parametrize("qtype,weighted", CASES, ids=lambda v: v.name if isinstance(v, QType) else f"imatrix={v}")
def test_bytes_match_ggml_on_every_input_class(qtype, weighted):
    rows = _every_input_class(16, 2048) if CUDA else _every_input_class(1, 768)
    importance = make_importance(rows.shape[1], seed=4, with_zeros=True) if weighted else None
    assert_same_bytes(_fused(rows, qtype, importance), _expected(rows, qtype, importance))


@runs_kernels
@pytest.mark.skipif(not CUDA, reason="thousands of programs: too slow for the interpreter")
@pytest.mark.parametrize("qtype,weighted", CASES, ids=lambda v: v.name if isinstance(v, QType) else f"imatrix={v}")
def test_bytes_match_ggml_on_many_heavy_tailed_blocks(qtype, weighted):
    """Enough blocks (16384 super-blocks) that a near-tie in a search would show as a flipped choice."""
    rows = make_rows("student_t3", 1024, 4096, seed=12)
    importance = make_importance(4096, seed=12) if weighted else None
    assert_same_bytes(_fused(rows, qtype, importance), _expected(rows, qtype, importance))


@runs_kernels
@pytest.mark.parametrize("qtype", kernels.TYPES, ids=lambda t: t.name)
def test_non_finite_input_is_left_to_the_torch_codecs(qtype):
    rows = make_special_rows(seed=5, n_rows=2, n_per_row=256)
    assert kernels.quantize(rows.to(DEVICE), qtype, None) is None


@runs_kernels
def test_far_outliers_with_zero_importance():
    rows, importance = far_outlier_rows()
    for qtype in K_TYPES:
        for weights in (None, importance):
            assert_same_bytes(_fused(rows, qtype, weights), _expected(rows, qtype, weights))


@runs_kernels
@pytest.mark.parametrize("qtype", kernels.TYPES, ids=lambda t: t.name)
def test_no_rows(qtype):
    encoded = kernels.quantize(torch.zeros((0, 256), device=DEVICE), qtype, None)
    assert encoded.shape == (0, row_nbytes(qtype, 256)) and encoded.dtype == torch.uint8


def test_kernels_are_chosen_for_their_types_on_cuda_only():
    assert all(quant._fused_kernels(torch.device("cuda"), qtype) is kernels for qtype in kernels.TYPES)
    assert quant._fused_kernels(torch.device("cuda"), QType.Q6_K) is None
    assert quant._fused_kernels(torch.device("cpu"), QType.Q4_K) is None


@pytest.mark.skipif(not CUDA, reason="quantize() takes the kernels on CUDA only")
def test_quantize_takes_the_kernels_on_cuda(monkeypatch):
    calls = []
    fused = kernels.quantize

    def recording(rows, qtype, importance):
        calls.append(qtype)
        return fused(rows, qtype, importance)

    monkeypatch.setattr(kernels, "quantize", recording)
    rows = make_rows("gaussian", 4, 512)
    for qtype in (QType.Q8_0, QType.Q4_K, QType.Q6_K):
        assert_same_bytes(quantize(rows.cuda(), qtype), _expected(rows, qtype, None))
    assert_same_bytes(quantize(rows.cuda(), QType.Q4_K, backend="torch"), _expected(rows, QType.Q4_K, None))
    assert calls == [QType.Q8_0, QType.Q4_K]


@pytest.mark.skipif(not CUDA, reason="quantize() takes the kernels on CUDA only")
def test_quantize_on_cuda_falls_back_for_non_finite_input():
    rows = make_special_rows(seed=6, n_rows=4, n_per_row=512, infinities=False)
    for qtype in kernels.TYPES:
        assert_same_bytes(quantize(rows.cuda(), qtype), quantize(rows.cuda(), qtype, backend="torch"))


@pytest.mark.skipif(RUNS_KERNELS_HERE, reason="the kernels' tests ran in this process")
def test_kernels_in_a_fresh_process():
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "not fresh_process and not compiled_code"], capture_output=True, text=True,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-3000:]


_PTX_CHECK = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gguf import GGMLQuantizationType as QType
from ewq_gguf.quant import triton_kernels as kernels

POINTERS = {"x_pointer": "*fp32", "importance_pointer": "*fp32", "out_pointer": "*u8", "flag_pointer": "*i32"}
for kernel, constants in [(kernels._q8_0_kernel, {"BLOCKS": kernels._Q8_0_BLOCKS}),
                          (kernels._affine_k_kernel, kernels.k_quant_constants(QType.Q4_K, False))]:
    signature = {name: "constexpr" if name in constants else POINTERS.get(name, "i32") for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(kernels.COMPILE_OPTIONS)).asm["ptx"]
    print(" ".join(sorted(set(re.findall(r"\\b(?:fma|div|rcp|sqrt)\\.[a-z.]*f32|\\.ftz", ptx)))))
"""


def test_compiled_code_rounds_like_ggml():
    """No multiply-add, division or root in the sm_90 PTX rounds other than once to nearest, nor flushes subnormals."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    q8_0_ops, k_quant_ops = result.stdout.split("\n")[:2]
    for ops in (q8_0_ops, k_quant_ops):
        assert "div.rn.f32" in ops.split()
        assert not re.search(r"fma|div\.full|div\.approx|rcp|sqrt\.approx|\.ftz", ops), ops
    assert "sqrt.rn.f32" in k_quant_ops.split()
