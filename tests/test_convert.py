"""Converter foundation: the GGUF computes the same function as the checkpoint, and user errors end cleanly."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from ewq_gguf.api import convert
from ewq_gguf.cli import main
from ewq_gguf.constants import KEY_EWQ_PLAN
from ewq_gguf.errors import InputError, OutputError, UnsupportedArchitectureError
from llama_runner import gguf_logits, hf_logits, relative_error
from testkit.tiny_models import make_tiny_model

TOKENS = [(7 * i + 3) % 200 + 5 for i in range(40)]


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("type_name, tolerance", [("F32", 1e-4), ("F16", 1e-2), ("BF16", 3e-2), ("Q8_0", 1e-1)])
def test_gguf_logits_match_transformers(tiny_llama, tiny_gguf, type_name, tolerance):
    before = folder_snapshot(tiny_llama)
    reference = hf_logits(tiny_llama, TOKENS)
    error = relative_error(gguf_logits(tiny_gguf(type_name), TOKENS), reference)
    assert error <= tolerance, f"{type_name}: relative error {error:.2e}"
    assert folder_snapshot(tiny_llama) == before


def test_uniform_types_and_metadata(tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf("Q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    plan = json.loads(reader.fields[KEY_EWQ_PLAN].contents())
    assert {e["name"] for e in plan["entries"]} == set(types)


def test_uniform_mxfp4_computes_its_decoded_weights(tiny_llama, tmp_path):
    """`convert --method uniform --type MXFP4`: every matrix MXFP4 (tensors of any shape may hold it, as with
    llama-quantize --pure MXFP4_MOE), and llama.cpp computes the checkpoint whose matrices are our decoded MXFP4
    values. What remains is llama.cpp's 8-bit activations (about 0.04 here; against the original weights 0.6)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ewq_gguf.quant import QType, dequantize, quantize

    out = tmp_path / "mxfp4.gguf"
    assert run_cli("convert", tiny_llama, out, "--method", "uniform", "--type", "MXFP4", "--quiet").returncode == 0
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"MXFP4"}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(dequantize(quantize(parameter, QType.MXFP4), QType.MXFP4, parameter.shape[1]))
        decoded = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert relative_error(gguf_logits(out, TOKENS), decoded) <= 0.1


def test_sharded_bf16_checkpoint_equals_single_file(tmp_path):
    single = make_tiny_model(tmp_path / "single", dtype=__import__("torch").bfloat16)
    sharded = make_tiny_model(tmp_path / "sharded", dtype=__import__("torch").bfloat16, max_shard_size="300KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = convert(single, tmp_path / "a.gguf", type="F32", progress=False)
    b = convert(sharded, tmp_path / "b.gguf", type="F32", progress=False)
    tensors_a = {t.name: bytes(t.data) for t in gguf.GGUFReader(a.path).tensors}
    tensors_b = {t.name: bytes(t.data) for t in gguf.GGUFReader(b.path).tensors}
    assert tensors_a == tensors_b


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """The CLI in-process (fast); test_cli_subprocess_exit_code checks the real executable once."""
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


def test_cli_subprocess_exit_code(tmp_path):
    out = tmp_path / "out.gguf"
    result = subprocess.run([sys.executable, "-m", "ewq_gguf", "convert", str(tmp_path / "nowhere"), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == f"error: model folder not found: {tmp_path / 'nowhere'}"


def assert_clean_failure(result: CliResult, out: Path, message: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


@pytest.fixture
def model_copy(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def test_missing_config(model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model_copy, out), out, "config.json not found")


def test_missing_weights(model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model_copy, out), out, "no model weights")


def test_unknown_architecture_lists_supported(model_copy, tmp_path):
    """Neither our adapters nor llama.cpp's converter know it: one line naming the supported ones."""
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["NoSuchForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model_copy, out), out, "LlamaForCausalLM")
    with pytest.raises(UnsupportedArchitectureError):
        convert(model_copy, out, progress=False)


def test_missing_tokenizer(model_copy, tmp_path):
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (model_copy / name).unlink(missing_ok=True)
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model_copy, out), out, "tokenizer")


def test_truncated_safetensors(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model_copy, out), out, "truncated")


def test_corrupt_safetensors_header(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32
    weights.write_bytes(bytes(data))
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model_copy, out), out, "corrupt safetensors header")


def test_missing_shard(tmp_path):
    model = make_tiny_model(tmp_path / "sharded", max_shard_size="300KB")
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.unlink()
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model, out), out, f"shard '{shard.name}' is missing")


def test_existing_output_refused_without_force(tiny_llama, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    result = run_cli("convert", tiny_llama, out, "--type", "F16")
    assert result.returncode != 0 and "exists" in result.stderr
    assert out.read_bytes() == b"precious"
    assert run_cli("convert", tiny_llama, out, "--type", "F16", "--force", "--quiet").returncode == 0
    assert gguf.GGUFReader(out).tensors


def test_unwritable_output_folder(tiny_llama, tmp_path):
    out = tmp_path / "missing-folder" / "out.gguf"
    result = run_cli("convert", tiny_llama, out)
    assert result.returncode != 0 and "does not exist" in result.stderr
    with pytest.raises(OutputError):
        convert(tiny_llama, out, progress=False)


def test_nan_weights_named(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = model_copy / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_cli("convert", model_copy, out, "--type", "Q8_0"), out, "blk.1.ffn_up.weight")


def test_unknown_type(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="supported"):
        convert(tiny_llama, tmp_path / "x.gguf", type="Q9_X", progress=False)


def test_validate_and_ollama_modelfile(tiny_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the keeper counted {n} ships on the {n % 7}th evening." for n in range(400)))
    out = tmp_path / "q8.gguf"
    result = run_cli("convert", tiny_llama, out, "--type", "Q8_0", "--quiet", "--validate", "--text", text,
                     "--ollama-modelfile")
    assert result.returncode == 0, result.stderr
    assert "kld" in result.stdout.lower() and "Modelfile" in result.stdout
    modelfile = (tmp_path / "Modelfile") if (tmp_path / "Modelfile").exists() else next(tmp_path.glob("*Modelfile*"))
    assert "FROM" in modelfile.read_text()
    reports = convert(tiny_llama, tmp_path / "q8b.gguf", type="Q8_0", progress=False, validate=True, text=text,
                      base=out).validation
    assert reports[1].kld == 0.0 and reports[1].top1 == 1.0
