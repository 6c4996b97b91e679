"""Developer scripts, grouped by purpose. The Python ones are modules of this package, run from the repository root
as `python -m scripts.GROUP.NAME --help`; they import their shared helpers (scripts.common) and the test fixtures
they reuse (testkit) as packages, never by patching sys.path.

    quickstart.sh, run_tests.sh   README's two commands: the main job end to end; install and run the tests (CI)
    setup/     the environment: .venv and its extras (env.sh), Debian's reference manual (text.sh), the development
               models (make_dev_model.py)
    bench/     benchmarks; each writes its own section of docs/results.md, headed by the command that made it
    check/     parity and identity checks: against llama-quantize, the --plan-out recipe round trip, byte-identical
               outputs before and after a change
    gpu/       batches for the device machine (bash scripts/gpu/NAME.sh), quoted in docs/results.md
    examples/  the README's Python example (fine-tune, then GGUF from memory)
    common/    what the scripts share: llama.cpp's tools run and measured, docs/results.md sections
"""
