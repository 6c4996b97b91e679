"""Architectures read through llama.cpp's converter (ewq_gguf/source/converter.py): mixture-of-experts and newer
dense designs, as tiny random checkpoints (testkit/tiny_models.CONVERTED).

For each: the F32 file's logits through llama-cpp-python equal transformers' on 40 tokens, llama.cpp's tokenizer
gives the Hugging Face tokenizer's ids, and our F32 / Q8_0 / Q4_K files hold the tensors of llama.cpp's own
convert_hf_to_gguf.py (F32, Q8_0) and llama-quantize --pure (Q4_K) made from the same folder, byte for byte.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType, GGUFReader

import ewq_gguf.source.model as source_model
from ewq_gguf import llamacpp
from ewq_gguf.api import convert
from ewq_gguf.errors import UnsupportedArchitectureError
from ewq_gguf.source.model import open_checkpoint
from llama_runner import gguf_logits, hf_logits, relative_error
from testkit.resources import llama_tool
from testkit.tiny_models import CONVERTED, make_tiny_model

TEXT = ("The quick brown fox jumps over the lazy dog, and then the cat sat on the mat near the door of the old house "
        "by the sea. Later that evening, the keeper counted twelve ships in the harbour and wrote the number down.")
N_TOKENS = 40


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """architecture -> (tiny checkpoint folder, {type name: our file}), made once per architecture."""
    made: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(architecture: str) -> tuple[Path, dict[str, Path]]:
        if architecture not in made:
            root = tmp_path_factory.mktemp(architecture)
            folder = make_tiny_model(root / "hf", architecture)
            files = {}
            for type_name in ("F32", "Q8_0", "Q4_K"):
                files[type_name] = root / f"ours-{type_name}.gguf"
                convert(folder, files[type_name], "uniform", type=type_name, progress=False)
            made[architecture] = folder, files
        return made[architecture]

    return get


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {tensor.name: (tensor.tensor_type.name, np.asarray(tensor.data).tobytes())
            for tensor in GGUFReader(path).tensors}


def llama_cpp_convert(folder: Path, out: Path, outtype: str) -> Path:
    script = llamacpp.converter_script()
    done = subprocess.run([sys.executable, str(script), str(folder), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("architecture", sorted(CONVERTED))
def test_logits_and_tokens_match_transformers(converted, architecture):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    folder, files = converted(architecture)
    token_ids = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"][:N_TOKENS]
    assert len(token_ids) == N_TOKENS
    error = relative_error(gguf_logits(files["F32"], token_ids), hf_logits(folder, token_ids))
    assert error <= 1e-4, f"{architecture}: relative error {error:.2e}"

    full = AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]
    vocab = Llama(str(files["F32"]), vocab_only=True, verbose=False)
    assert vocab.tokenize(TEXT.encode(), add_bos=full[0] == vocab.token_bos(), special=False) == full


@pytest.mark.parametrize("architecture", sorted(CONVERTED))
def test_files_equal_llama_cpp_conversion(converted, architecture, tmp_path):
    folder, files = converted(architecture)
    reference_f32 = llama_cpp_convert(folder, tmp_path / "f32.gguf", "f32")
    assert tensors(files["F32"]) == tensors(reference_f32)
    assert tensors(files["Q8_0"]) == tensors(llama_cpp_convert(folder, tmp_path / "q8_0.gguf", "q8_0"))
    quantized = tmp_path / "q4_k.gguf"
    done = subprocess.run([str(llama_tool("llama-quantize")), "--pure", str(reference_f32), str(quantized), "Q4_K_S"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert tensors(files["Q4_K"]) == tensors(quantized)


def test_expert_tensors_are_planned_per_block(converted, tmp_path):
    """An entropy plan of a mixture of experts: stacked 3-D expert tensors take different types in different blocks,
    the routers stay F32 as llama.cpp keeps them, and llama.cpp loads the file."""
    folder, _ = converted("MixtralForCausalLM")
    result = convert(folder, tmp_path / "ewq.gguf", "ewq", progress=False)
    experts = {entry.name: entry.type for entry in result.plan.entries if "_exps." in entry.name}
    assert experts and all(len(entry.shape) == 3 for entry in result.plan.entries if "_exps." in entry.name)
    assert len({experts[name] for name in experts if name.startswith("blk.0.")} |
               {experts[name] for name in experts if name.startswith("blk.1.")}) >= 2
    routers = [entry for entry in result.plan.entries if "ffn_gate_inp" in entry.name]
    assert routers and all(entry.type == QType.F32 and entry.reason == "llama.cpp keeps it in F32"
                           for entry in routers)
    assert gguf_logits(tmp_path / "ewq.gguf", [1, 2, 3]).shape[0] == 3


def test_unknown_architecture_names_itself_and_the_supported(tmp_path, converted):
    folder, _ = converted("MixtralForCausalLM")
    strange = tmp_path / "strange"
    strange.mkdir()
    for path in folder.iterdir():
        (strange / path.name).write_bytes(path.read_bytes())
    config = (strange / "config.json").read_text().replace("MixtralForCausalLM", "NoSuchForCausalLM")
    (strange / "config.json").write_text(config)
    with pytest.raises(UnsupportedArchitectureError, match="NoSuchForCausalLM.*MixtralForCausalLM"):
        open_checkpoint(strange)


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"])
def test_both_routes_write_the_same_tensors(tmp_path, monkeypatch, architecture):
    """Where our own adapters read a family, llama.cpp's converter gives the same tensors, byte for byte (README,
    "Supported architectures": why both routes stay). The tokenizer is one the converter recognises."""
    folder = make_tiny_model(tmp_path / "hf", architecture, tokenizer_style="devmodel")
    ours = convert(folder, tmp_path / "adapter.gguf", "uniform", type="Q8_0", progress=False).path
    monkeypatch.setattr(source_model, "has_adapter", lambda config: False)
    theirs = convert(folder, tmp_path / "converter.gguf", "uniform", type="Q8_0", progress=False).path
    assert tensors(ours) == tensors(theirs)
