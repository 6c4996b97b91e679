"""The Python API: its names, one pipeline behind the CLI and every entry point, typed errors, no printing."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import ewq_gguf
from ewq_gguf import EwqGgufError, InputError, OutputError, Plan, UnsupportedArchitectureError
from ewq_gguf.cli import main
from testkit.tiny_tokenizers import SAMPLE_TEXT

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def live(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


def test_public_names_are_documented_and_typed():
    assert (Path(ewq_gguf.__file__).parent / "py.typed").is_file()
    for name in ewq_gguf.__all__:
        value = getattr(ewq_gguf, name)
        if callable(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
        if inspect.isfunction(value):
            hints = inspect.signature(value)
            assert hints.return_annotation is not inspect.Signature.empty, f"{name} has no return type"
            assert all(p.annotation is not inspect.Parameter.empty for p in hints.parameters.values()), name
    for error in (InputError, OutputError, UnsupportedArchitectureError):
        assert issubclass(error, EwqGgufError)


def test_import_and_validation_commands_do_not_load_torch():
    # `ewq-gguf perplexity` / `inspect` start in a fraction of a second only if torch (~2 s to import) stays out
    script = (
        "import sys, ewq_gguf, ewq_gguf.cli, ewq_gguf.validate, ewq_gguf.gguf_file.inspect\n"
        "assert callable(ewq_gguf.perplexity) and callable(ewq_gguf.compare)\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "import ewq_gguf.plan.optimal\n"
        "assert ewq_gguf.plan.__module__ == 'ewq_gguf.live_api', ewq_gguf.plan\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)


def test_plan_function_leaves_the_planners_importable():
    from ewq_gguf.plan import Plan as PackagePlan
    from ewq_gguf.plan.ewq import ewq_plan

    assert callable(ewq_gguf.plan) and PackagePlan is Plan and callable(ewq_plan)


def read(path: Path) -> bytes:
    return Path(path).read_bytes()


@pytest.mark.parametrize("cli_args, options", [
    (["--type", "Q8_0"], {"type": "Q8_0"}),
    (["--method", "ewq", "--types", "Q4_0,Q5_1,F16", "--k", "0.3", "--entropy", "histogram"],
     {"method": "ewq", "types": "Q4_0,Q5_1,F16", "k": 0.3, "entropy": "histogram"}),
    (["--method", "zd", "--fraction", "0.5", "--embed-type", "Q4_0"],
     {"method": "zd", "fraction": 0.5, "embed_type": "Q4_0"})], ids=["uniform", "ewq", "zd"])
def test_cli_and_api_write_the_same_file(tiny_llama, live, tmp_path, cli_args, options):
    result = CliRunner().invoke(main, ["convert", str(tiny_llama), str(tmp_path / "cli.gguf"), "--quiet", *cli_args])
    assert result.exit_code == 0, result.output
    api = ewq_gguf.convert(tiny_llama, tmp_path / "api.gguf", progress=False, **options)
    exported = ewq_gguf.export(*live, tmp_path / "export.gguf", progress=False, **options)
    assert read(tmp_path / "cli.gguf") == read(api.path) == read(exported.path)


def test_analyze_and_plan_take_a_folder_or_a_model(tiny_llama, live, tmp_path):
    model, tokenizer = live
    from_folder, from_model = ewq_gguf.analyze(tiny_llama, progress=False), ewq_gguf.analyze(model, progress=False)
    assert from_folder.blocks == from_model.blocks and from_model.model == tiny_llama.name
    decided = ewq_gguf.plan(model, "ewq", analysis=from_model, types="Q4_0,Q8_0,F16")
    assert decided.to_json() == ewq_gguf.plan(tiny_llama, "ewq", types="Q4_0,Q8_0,F16", progress=False).to_json()
    restored = Plan.from_json(decided.to_json())
    assert restored.to_json() == decided.to_json() and restored.bits_per_weight == decided.bits_per_weight
    decided.save(tmp_path / "plan.json")
    exported = ewq_gguf.export(model, tokenizer, tmp_path / "a.gguf", plan=tmp_path / "plan.json", progress=False)
    converted = ewq_gguf.convert(tiny_llama, tmp_path / "b.gguf", plan=tmp_path / "plan.json", progress=False)
    assert read(exported.path) == read(converted.path)
    assert [(e.name, e.type) for e in exported.plan.entries] == [(e.name, e.type) for e in decided.entries]


def test_result_describes_the_file(live, tmp_path):
    result = ewq_gguf.export(*live, tmp_path / "out.gguf", type="Q8_0", progress=False)
    assert result.path == tmp_path / "out.gguf" and result.bytes == result.path.stat().st_size
    tensors = gguf.GGUFReader(result.path).tensors
    tensor_bits = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    assert result.bits_per_weight == pytest.approx(tensor_bits)
    assert {entry.name for entry in result.plan.entries} == {t.name for t in tensors}
    assert result.seconds > 0 and {"plan", "read", "quantize", "write"} <= set(result.stage_seconds)
    dry = ewq_gguf.export(*live, tmp_path / "dry.gguf", type="Q8_0", dry_run=True, progress=False)
    assert dry.path is None and dry.bytes == result.bytes and not (tmp_path / "dry.gguf").exists()


def test_api_prints_nothing(tiny_llama, live, tmp_path, capfd):
    ewq_gguf.convert(tiny_llama, tmp_path / "a.gguf", type="Q4_K", progress=False)
    ewq_gguf.export(*live, tmp_path / "b.gguf", progress=False)
    ewq_gguf.plan(live[0], "ewq", progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bars_when_asked(tiny_llama, tmp_path, capfd):
    ewq_gguf.convert(tiny_llama, tmp_path / "a.gguf", progress=True)
    captured = capfd.readouterr()
    assert captured.out == "" and "analysing" in captured.err and "writing" in captured.err


def test_errors_are_typed(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="model folder not found"):
        ewq_gguf.convert(tmp_path / "nowhere", tmp_path / "out.gguf", progress=False)
    with pytest.raises(InputError, match="model folder not found"):
        ewq_gguf.analyze(tmp_path / "nowhere", progress=False)
    with pytest.raises(InputError, match="unknown method"):
        ewq_gguf.plan(tiny_llama, "fastest")
    with pytest.raises(InputError, match="not used by"):
        ewq_gguf.plan(tiny_llama, "uniform", k=0.5)
    with pytest.raises(InputError, match="analysis="):
        ewq_gguf.plan(ewq_gguf.analyze(tiny_llama, progress=False))
    with pytest.raises(InputError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(InputError):
        ewq_gguf.perplexity(tmp_path / "absent.gguf", progress=False)
    with pytest.raises(InputError, match="at least one candidate"):
        ewq_gguf.compare(tmp_path / "absent.gguf", [], progress=False)
    (tmp_path / "out.gguf").write_bytes(b"x")
    with pytest.raises(OutputError, match="exists"):
        ewq_gguf.convert(tiny_llama, tmp_path / "out.gguf", type="F16", progress=False)


def test_perplexity_and_compare_of_an_exported_file(live, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    base = ewq_gguf.export(*live, tmp_path / "f32.gguf", type="F32", progress=False)
    candidate = ewq_gguf.export(*live, tmp_path / "q4.gguf", type="Q4_0", progress=False)
    report = ewq_gguf.perplexity(base.path, text=text, ctx=64, chunks=2, threads=1, progress=False)
    assert report.ppl > 1 and report.bytes == base.bytes
    reports = ewq_gguf.compare(base.path, [candidate.path], text=text, ctx=64, chunks=2, threads=1,
                               cache_dir=tmp_path / "cache", progress=False)
    assert [r.file for r in reports] == [str(base.path), str(candidate.path)] and reports[1].kld > 0


def test_finetune_then_export_example(tiny_llama, tmp_path):
    """scripts/examples/finetune_export.py, the README's example, runs and writes the fine-tuned weights."""
    out = tmp_path / "finetuned.gguf"
    run = subprocess.run([sys.executable, "-m", "scripts.examples.finetune_export", str(tiny_llama), str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "step 2: loss" in run.stdout and f"wrote {out}" in run.stdout
    original = ewq_gguf.convert(tiny_llama, tmp_path / "original.gguf", plan=out, progress=False)
    finetuned = {t.name: bytes(t.data) for t in gguf.GGUFReader(out).tensors}
    untouched = {t.name: bytes(t.data) for t in gguf.GGUFReader(original.path).tensors}
    assert finetuned.keys() == untouched.keys() and finetuned != untouched
