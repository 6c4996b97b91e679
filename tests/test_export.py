"""export(): a transformers (or PEFT) model in memory gives the bytes save_pretrained + convert gives, unchanged."""
from __future__ import annotations

import copy
import hashlib
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import ewq_gguf
from ewq_gguf import InputError, OutputError, UnsupportedArchitectureError
from ewq_gguf.source.live import live_tensors
from testkit.tiny_models import TINY, make_tiny_model

TRAINING_TEXT = "The lighthouse keeper counted the ships every evening, twelve on quiet nights."
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Factory: a tiny checkpoint folder per architecture, made once per module."""
    made: dict[str, Path] = {}

    def folder(architecture: str) -> Path:
        if architecture not in made:
            made[architecture] = make_tiny_model(tmp_path_factory.mktemp(architecture) / "tiny", architecture)
        return made[architecture]

    return folder


def load(folder: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def finetune(model, tokenizer, steps: int = 2) -> None:
    """A few real SGD steps, so that the weights differ from any saved copy."""
    ids = tokenizer(TRAINING_TEXT, return_tensors="pt").input_ids
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def saved_folder(model, tokenizer_folder: Path, folder: Path) -> Path:
    """model.save_pretrained(folder) beside the tokenizer files the model came with."""
    model.save_pretrained(folder)
    for path in tokenizer_folder.iterdir():
        if path.name not in WEIGHT_FILES and not path.name.startswith("model-"):
            shutil.copy(path, folder / path.name)
    return folder


def digest(model) -> str:
    hasher = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


@pytest.mark.parametrize("architecture", list(TINY))
@pytest.mark.parametrize("options", [{"type": "Q8_0"}, {"method": "ewq", "types": "Q4_0,Q8_0,F16"}],
                         ids=["uniform", "ewq"])
def test_export_equals_save_pretrained_then_convert(tiny_folders, tmp_path, architecture, options):
    source = tiny_folders(architecture)
    model, tokenizer = load(source)
    finetune(model, tokenizer)
    exported = ewq_gguf.export(model, tokenizer, tmp_path / "exported.gguf", progress=False, **options)
    # the folder has the source's name, which is the exported file's default general.name
    folder = saved_folder(model, source, tmp_path / "saved" / source.name)
    converted = ewq_gguf.convert(folder, tmp_path / "converted.gguf", progress=False, **options)
    assert exported.path.read_bytes() == converted.path.read_bytes()
    assert (exported.bytes, exported.bits_per_weight) == (converted.bytes, converted.bits_per_weight)
    assert exported.plan.to_json() == converted.plan.to_json()


@pytest.mark.parametrize("architecture, dtype, type_name", [
    ("LlamaForCausalLM", torch.bfloat16, "BF16"), ("GemmaForCausalLM", torch.bfloat16, "Q8_0"),
    ("Phi3ForCausalLM", torch.float16, "F16"), ("Qwen2ForCausalLM", torch.float16, "Q4_K")])
def test_export_keeps_the_model_dtype(tiny_folders, tmp_path, architecture, dtype, type_name):
    """save_pretrained writes the model's current dtype, and convert quantizes from it: so does export."""
    source = tiny_folders(architecture)
    model, tokenizer = load(source, dtype)
    exported = ewq_gguf.export(model, tokenizer, tmp_path / "exported.gguf", type=type_name, progress=False)
    folder = saved_folder(model, source, tmp_path / "saved" / source.name)
    converted = ewq_gguf.convert(folder, tmp_path / "converted.gguf", type=type_name, progress=False)
    assert exported.path.read_bytes() == converted.path.read_bytes()


@pytest.mark.parametrize("architecture", list(TINY))
def test_live_names_are_the_saved_names(tiny_folders, architecture):
    from safetensors import safe_open

    model, _ = load(tiny_folders(architecture))
    with safe_open(tiny_folders(architecture) / "model.safetensors", "pt") as saved:
        assert set(live_tensors(model)) == set(saved.keys())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_is_unchanged(tiny_folders, tmp_path, dtype):
    """Every quantizer family runs straight on the model's own tensors; none may write into them."""
    model, tokenizer = load(tiny_folders("GemmaForCausalLM"), dtype)
    before = digest(model)
    for type_name in ("F32", "BF16", "Q8_0", "Q4_1", "Q5_0", "IQ4_NL", "Q4_K", "Q6_K", "Q3_K"):
        ewq_gguf.export(model, tokenizer, tmp_path / f"{type_name}.gguf", type=type_name, progress=False)
    ewq_gguf.export(model, tokenizer, tmp_path / "ewq.gguf", types="Q2_K,Q5_K,IQ4_XS", progress=False)
    assert digest(model) == before


@pytest.fixture(scope="module")
def peft():
    """peft (the peft extra, part of the test extra), for the tests of adapter merging only."""
    return pytest.importorskip("peft")


def lora_model(peft, model, **settings):
    return peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False,
                                                          **settings}))


@pytest.mark.parametrize("architecture, dtype, settings", [
    ("LlamaForCausalLM", torch.float32, dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                             modules_to_save=["lm_head"])),
    ("Qwen2ForCausalLM", torch.bfloat16, dict(target_modules=["q_proj", "k_proj"], lora_bias=True)),
    # tied embeddings with a LoRA on the embedding: merging changes the one weight both names share
    ("Qwen3ForCausalLM", torch.bfloat16, dict(target_modules=["embed_tokens", "o_proj", "up_proj"],
                                              use_rslora=True)),
    ("Phi3ForCausalLM", torch.float16, dict(target_modules=["qkv_proj", "gate_up_proj"], lora_alpha=32))],
    ids=["llama-modules_to_save", "qwen2-bf16-lora_bias", "qwen3-tied-embedding-rslora", "phi3-f16-fused"])
def test_peft_export_equals_merged_export(tiny_folders, tmp_path, peft, architecture, dtype, settings):
    model, tokenizer = load(tiny_folders(architecture), dtype)
    adapted = lora_model(peft, model, **settings)
    before = digest(adapted)
    exported = ewq_gguf.export(adapted, tokenizer, tmp_path / "lora.gguf", type="F32", progress=False)
    assert digest(adapted) == before
    merged = copy.deepcopy(adapted).merge_and_unload()
    expected = ewq_gguf.export(merged, tokenizer, tmp_path / "merged.gguf", type="F32", progress=False)
    assert exported.path.read_bytes() == expected.path.read_bytes()
    base_only = ewq_gguf.export(adapted.get_base_model(), tokenizer, tmp_path / "b.gguf", type="F32", progress=False)
    assert base_only.path.read_bytes() == exported.path.read_bytes()   # the base model is the adapted one


def test_peft_two_active_adapters_and_a_merged_one(tiny_folders, tmp_path, peft):
    model, tokenizer = load(tiny_folders("MistralForCausalLM"))
    adapted = lora_model(peft, model, target_modules=["q_proj", "o_proj"])
    adapted.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "up_proj"],
                                                   init_lora_weights=False))
    adapted.base_model.set_adapter(["default", "second"])
    reference = copy.deepcopy(adapted).merge_and_unload()
    expected = ewq_gguf.export(reference, tokenizer, tmp_path / "merged.gguf", type="F32", progress=False)
    assert ewq_gguf.export(adapted, tokenizer, tmp_path / "two.gguf", type="F32",
                           progress=False).path.read_bytes() == expected.path.read_bytes()
    # adapters already merged into the base weights (merge_adapter) are not added a second time
    adapted.merge_adapter()
    assert ewq_gguf.export(adapted, tokenizer, tmp_path / "premerged.gguf", type="F32",
                           progress=False).path.read_bytes() == expected.path.read_bytes()


def test_adapter_layers_in_a_plain_model(tiny_folders, tmp_path, peft):
    """LoRA layers inside a transformers model with no PeftModel around it, as transformers' own integration
    (model.add_adapter) and peft's inject_adapter_in_model leave them."""
    model, tokenizer = load(tiny_folders("LlamaForCausalLM"))
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"],
                                                         init_lora_weights=False), model)
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
    plain = load(tiny_folders("LlamaForCausalLM"))[0]
    assert set(live_tensors(model)) == set(live_tensors(plain))
    exported = ewq_gguf.export(model, tokenizer, tmp_path / "a.gguf", type="F32", progress=False)
    expected = ewq_gguf.export(reference, tokenizer, tmp_path / "b.gguf", type="F32", progress=False)
    unadapted = ewq_gguf.export(plain, tokenizer, tmp_path / "c.gguf", type="F32", progress=False)
    assert exported.path.read_bytes() == expected.path.read_bytes() != unadapted.path.read_bytes()


def test_offloaded_model(tiny_folders, tmp_path):
    """device_map with parts offloaded to disk: those weights are read from accelerate's offload files."""
    source = tiny_folders("LlamaForCausalLM")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload"))
    assert any(parameter.device.type == "meta" for parameter in model.parameters())
    exported = ewq_gguf.export(model, AutoTokenizer.from_pretrained(source), tmp_path / "a.gguf", type="Q8_0",
                               progress=False)
    converted = ewq_gguf.convert(source, tmp_path / "b.gguf", type="Q8_0", progress=False)
    assert exported.path.read_bytes() == converted.path.read_bytes()


def test_tokenizer_from_a_folder_and_a_name(tiny_folders, tmp_path):
    source = tiny_folders("Qwen2ForCausalLM")
    model, tokenizer = load(source)
    by_object = ewq_gguf.export(model, tokenizer, tmp_path / "a.gguf", type="F16", name="mine", progress=False)
    by_folder = ewq_gguf.export(model, source, tmp_path / "b.gguf", type="F16", name="mine", progress=False)
    assert by_object.path.read_bytes() == by_folder.path.read_bytes()
    from ewq_gguf.gguf_file import read_gguf

    assert read_gguf(by_object.path).metadata["general.name"] == "mine"


# --- errors --------------------------------------------------------------------------------------------------------

def test_export_errors(tiny_folders, tmp_path):
    model, tokenizer = load(tiny_folders("LlamaForCausalLM"))
    out = tmp_path / "out.gguf"
    with pytest.raises(InputError, match="tokenizer"):
        ewq_gguf.export(model, None, out, progress=False)
    with pytest.raises(InputError, match="tokenizer folder not found"):
        ewq_gguf.export(model, tmp_path / "nowhere", out, progress=False)
    with pytest.raises(InputError, match="not a transformers model"):
        ewq_gguf.export(torch.nn.Linear(4, 4), tokenizer, out, progress=False)
    with pytest.raises(InputError, match="calibration"):
        ewq_gguf.export(model, tokenizer, out, "lim", progress=False)
    with pytest.raises(InputError, match="supported"):
        ewq_gguf.export(model, tokenizer, out, type="Q9_X", progress=False)
    with pytest.raises(OutputError, match="does not exist"):
        ewq_gguf.export(model, tokenizer, tmp_path / "missing" / "out.gguf", type="F16", progress=False)
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists"):
        ewq_gguf.export(model, tokenizer, out, type="F16", progress=False)
    assert out.read_bytes() == b"precious"
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(InputError, match="blk.1.ffn_up.weight"):
        ewq_gguf.export(model, tokenizer, tmp_path / "nan.gguf", type="Q8_0", progress=False)
    assert not (tmp_path / "nan.gguf").exists()


def test_unsupported_architecture(tiny_folders, tmp_path):
    config = AutoConfig.for_model("olmo", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folders("LlamaForCausalLM"))
    with pytest.raises(UnsupportedArchitectureError, match="OlmoForCausalLM"):
        ewq_gguf.export(model, tokenizer, tmp_path / "out.gguf", progress=False)


def test_unmergeable_adapters_refused(tiny_folders, tmp_path, peft):
    model, tokenizer = load(tiny_folders("LlamaForCausalLM"))
    dora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(InputError, match="DoRA"):
        ewq_gguf.export(dora, tokenizer, tmp_path / "a.gguf", progress=False)
    ia3 = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                    feedforward_modules=["down_proj"]))
    with pytest.raises(InputError, match="only LoRA"):
        ewq_gguf.export(ia3, tokenizer, tmp_path / "b.gguf", progress=False)
    assert not list(tmp_path.iterdir())


def test_missing_peft_is_an_input_error(tiny_folders, tmp_path, monkeypatch, peft):
    model, tokenizer = load(tiny_folders("LlamaForCausalLM"))
    adapted = lora_model(peft, model, target_modules=["q_proj"])
    for name in [name for name in sys.modules if name == "peft" or name.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)   # import peft now fails, as when it is not installed
    with pytest.raises(InputError, match=r"pip install 'ewq-gguf\[peft\]'"):
        ewq_gguf.export(adapted, tokenizer, tmp_path / "a.gguf", progress=False)


def test_weights_on_the_meta_device_refused(tiny_folders, tmp_path):
    config = AutoConfig.from_pretrained(tiny_folders("LlamaForCausalLM"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(InputError, match="meta device"):
        ewq_gguf.export(model, tiny_folders("LlamaForCausalLM"), tmp_path / "a.gguf", progress=False)


def test_compiled_model(tiny_folders, tmp_path):
    """torch.compile's wrapper names every tensor _orig_mod.*; the model under it is exported."""
    model, tokenizer = load(tiny_folders("Qwen2ForCausalLM"))
    compiled = ewq_gguf.export(torch.compile(model), tokenizer, tmp_path / "a.gguf", type="F16", progress=False)
    plain = ewq_gguf.export(model, tokenizer, tmp_path / "b.gguf", type="F16", progress=False)
    assert compiled.path.read_bytes() == plain.path.read_bytes()
