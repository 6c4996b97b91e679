"""The one part of the build that pyproject.toml cannot declare (setuptools' ext-modules table there is still
experimental): the native backend's encoders (ewq_gguf/quant/native_backend.py), compiled by `pip install`.

Optional: where they do not compile, the install goes on and ggml's encoders do the CPU's work. -ffp-contract=off and
no -ffast-math keep every float operation one IEEE float32 operation in ggml's order (gcc fuses multiply-adds by
default on targets that have them). Two flags change no value and only let loops over lanes vectorize:
-fno-math-errno (sqrtf is correctly rounded either way, errno is never read) and -fno-trapping-math (a select
between two floats may compute both; nothing here or in Python enables floating-point traps).
"""
from setuptools import Extension, setup

NATIVE = "ewq_gguf/quant/native/"

setup(ext_modules=[Extension(
    "ewq_gguf.quant._native",
    sources=[NATIVE + name for name in ("module.c", "kernels_baseline.c", "kernels_avx2.c", "kernels_avx512.c")],
    depends=[NATIVE + "kernels.h", NATIVE + "types.h"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c11"],
    optional=True,
)])
