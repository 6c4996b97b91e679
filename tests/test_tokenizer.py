"""ewq_gguf.source.tokenizer: llama.cpp, loading only the GGUF vocabulary we write, must tokenise as the HF tokenizer does.

Every equality check runs the real llama.cpp tokenizer (llama-cpp-python, vocab_only) on a minimal GGUF that holds
general.architecture and the tokenizer.* keys, against tokenizer.encode on the same text, with and without the
special tokens the model adds.
"""
from __future__ import annotations

import json
import shutil
import unicodedata
import warnings
from contextlib import closing
from pathlib import Path

import gguf
import pytest
import sentencepiece
from llama_cpp import Llama
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ewq_gguf.errors import InputError
from ewq_gguf.source.tokenizer import (PRE_TOKENIZERS, TokenizerWarning, add_tokenizer, add_tokenizer_from_hf, build_vocab,
                                write_vocab)
from testkit.tiny_tokenizers import BPE_STYLES, SAMPLE_TEXT, make_bpe_tokenizer, make_spm_tokenizer


TEXTS = [
    "Hello world",
    "The quick brown fox can't jump; we'll see, isn't it? THEY'RE LOUD, I'M SURE.",
    "def square(x: int) -> int:\n    return x ** 2  # the square\n\n\n\tif x:\n\t\tpass\r\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C++\n<div class=\"x\">&amp;</div>",
    "12345 3.14159 1,000,000 2024-05-06 000123 +44 20 7946 0958 $1,299.99 50%",
    "a  b   c    d\n\n\n \n  \t\t x\t \n",
    "trailing spaces   ",
    "Смотритель маяка считал корабли. 灯塔看守人每天晚上都数船。 حارس المنارة يعد السفن. प्रकाशस्तंभ का रक्षक",
    "Ο φαροφύλακας μετρούσε τα πλοία. 등대지기는 배를 세었다. ผู้ดูแลประภาคาร",
    "🚢⚓🌊 👩🏽‍✈️ 🎉🎉 ✅",
    "naïve café résumé ½ ² ³ Ω µ ≤ ≥ — “quotes” «guillemets» …",
    "ÿ€\x00\x01\x7f control bytes",
    "",
    "\n",
    " ",
    " Hello",
    "  leading spaces",
    "  1  22   333",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<s>[INST] hi [/INST] ok</s>",
    "x <tool_call> y</tool_call>z<|endoftext|>",
]
SAMPLE_LINES = SAMPLE_TEXT.splitlines(keepends=True)
EXPECTED_PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "smollm": "smollm", "gpt2": "gpt-2"}


def write_vocab_only_gguf(path: Path, write_tokenizer) -> Path:
    """A GGUF with only general.architecture and the tokenizer keys: all llama.cpp reads with vocab_only."""
    writer = gguf.GGUFWriter(str(path), "llama")
    write_tokenizer(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def convert(folder: Path, config: dict | None = None) -> tuple[Path, list[str]]:
    """add_tokenizer on an HF folder -> (vocab-only GGUF, messages of the TokenizerWarnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_vocab_only_gguf(folder.with_suffix(".gguf"),
                                     lambda writer: add_tokenizer(writer, folder, config or {}))
    return path, [str(w.message) for w in caught if issubclass(w.category, TokenizerWarning)]


def mismatches(gguf_path: Path, tokenizer, texts: list[str]) -> list[tuple[str, bool, list[str], list[str]]]:
    """(text, add_special, HF pieces, llama.cpp pieces) for every text where the two tokenisations differ."""
    found = []
    with closing(Llama(str(gguf_path), vocab_only=True, verbose=False)) as llm:
        for text in texts:
            for add_special in (True, False):
                expected = tokenizer.encode(text, add_special_tokens=add_special)
                actual = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
                if expected != actual:
                    found.append((text, add_special, tokenizer.convert_ids_to_tokens(expected),
                                  tokenizer.convert_ids_to_tokens(actual)))
    return found


def has_added_token(tokenizer, text: str) -> bool:
    return any(token.content in text for token in tokenizer.added_tokens_decoder.values())


@pytest.fixture(scope="module")
def bpe_folders(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("bpe")
    return {style: (root / style, make_bpe_tokenizer(root / style, style)) for style in BPE_STYLES}


@pytest.fixture(scope="module")
def spm_folders(tmp_path_factory) -> dict[tuple[str, bool], tuple[Path, object]]:
    root = tmp_path_factory.mktemp("spm")
    folders = {}
    for style in ("llama2", "gemma"):
        for keep_model_file in (True, False):
            folder = root / f"{style}-{'model' if keep_model_file else 'json'}"
            folders[style, keep_model_file] = (folder, make_spm_tokenizer(folder, style,
                                                                          keep_model_file=keep_model_file))
    return folders


@pytest.mark.parametrize("style", BPE_STYLES)
def test_byte_level_bpe_tokenises_like_hf(bpe_folders, style):
    folder, tokenizer = bpe_folders[style]
    gguf_path, warned = convert(folder)
    fields = gguf.GGUFReader(gguf_path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == EXPECTED_PRE[style]
    assert mismatches(gguf_path, tokenizer, TEXTS + SAMPLE_LINES) == []
    # only the NFC normaliser of the qwen2 style is something llama.cpp cannot do
    assert len(warned) == (1 if style == "qwen2" else 0), warned


def test_nfc_warning_is_true(bpe_folders):
    folder, tokenizer = bpe_folders["qwen2"]
    gguf_path, warned = convert(folder)
    assert any("NFC" in message for message in warned)
    decomposed = "cafe\u0301 nai\u0308ve"
    assert [text for text, *_ in mismatches(gguf_path, tokenizer, [decomposed, unicodedata.normalize(
        "NFC", decomposed)])] == [decomposed, decomposed]


def train_split_tokenizer(regexes: tuple[str, ...], ignore_merges: bool, clean_spaces: bool,
                          eos_token: str | None = "<|im_end|>"):
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SAMPLE_LINES, trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token,
                                   clean_up_tokenization_spaces=clean_spaces)


@pytest.mark.parametrize("pre", PRE_TOKENIZERS, ids=lambda pre: pre.name)
def test_every_known_pre_tokenizer_is_recognised_and_splits_like_hf(tmp_path, pre):
    tokenizer = train_split_tokenizer(pre.regexes, pre.ignore_merges, pre.clean_spaces)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vocab = build_vocab(tokenizer, {})
    assert vocab.pre == pre.name
    gguf_path = write_vocab_only_gguf(tmp_path / "vocab.gguf", lambda writer: write_vocab(writer, vocab))
    differing = {text for text, *_ in mismatches(gguf_path, tokenizer, TEXTS + SAMPLE_LINES)}
    if pre.approximation is None:
        assert differing == set()
        assert not caught
    else:
        # the warning names the cause: only texts with combining marks may split differently
        assert [str(w.message) for w in caught] == [f"pre-tokenizer '{pre.name}': {pre.approximation}"]
        assert all(any(unicodedata.category(char).startswith("M") for char in text) for text in differing)


@pytest.mark.parametrize("style", ["llama2", "gemma"])
@pytest.mark.parametrize("keep_model_file", [True, False], ids=["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_tokenises_like_hf(spm_folders, style, keep_model_file):
    folder, tokenizer = spm_folders[style, keep_model_file]
    gguf_path, warned = convert(folder)
    fields = gguf.GGUFReader(gguf_path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is (style == "llama2")
    # transformers' Metaspace adds no "▁" to a text that already starts with a space; SentencePiece and llama.cpp do
    starts_with_space = [text for text in TEXTS + SAMPLE_LINES if text.startswith(" ")]
    differing = {text for text, *_ in mismatches(gguf_path, tokenizer, TEXTS + SAMPLE_LINES)}
    if style == "gemma":
        assert differing == set()
        assert warned == []
        return
    assert differing == set(starts_with_space)
    assert len(warned) == 1 and "already begins with one" in warned[0]
    # ...and the difference is exactly that space: llama.cpp on the text equals HF on the text with one more space
    plain = [text for text in starts_with_space if not has_added_token(tokenizer, text)]
    with closing(Llama(str(gguf_path), vocab_only=True, verbose=False)) as llm:
        for text in plain:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
                " " + text, add_special_tokens=False)


@pytest.mark.parametrize("style", ["llama2", "gemma"])
def test_llama_cpp_tokenises_like_sentencepiece(spm_folders, style):
    folder, tokenizer = spm_folders[style, True]
    gguf_path, _ = convert(folder)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    plain = [text for text in TEXTS + SAMPLE_LINES if not has_added_token(tokenizer, text)]
    with closing(Llama(str(gguf_path), vocab_only=True, verbose=False)) as llm:
        for text in plain:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == processor.encode(text), text


def test_sentencepiece_token_types_and_special_ids(spm_folders):
    vocab = build_vocab(spm_folders["gemma", True][1], {})
    tokens, types = vocab.tokens, vocab.token_types
    assert (vocab.pad_id, vocab.eos_id, vocab.bos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert (vocab.add_bos, vocab.add_eos) == (True, False)
    assert types[3] == gguf.TokenType.UNKNOWN
    assert [types[tokens.index(t)] for t in ("<bos>", "<start_of_turn>")] == [gguf.TokenType.CONTROL] * 2
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert vocab.scores is not None and len(vocab.scores) == len(tokens)
    # the json-only conversion rebuilds the same types
    assert build_vocab(spm_folders["gemma", False][1], {}).token_types == types


def test_added_tokens_are_control_or_user_defined(bpe_folders):
    with pytest.warns(TokenizerWarning, match="NFC"):
        vocab = build_vocab(bpe_folders["qwen2"][1], {})
    kind = {token: vocab.token_types[vocab.tokens.index(token)] for token in ("<|im_start|>", "<tool_call>", "Ġw")}
    assert kind == {"<|im_start|>": gguf.TokenType.CONTROL, "<tool_call>": gguf.TokenType.USER_DEFINED,
                    "Ġw": gguf.TokenType.NORMAL}


@pytest.mark.parametrize("style, bos, add_bos", [
    ("llama3", "<|begin_of_text|>", True), ("smollm", "<|im_start|>", False), ("qwen2", None, False)])
def test_bos_is_added_as_hf_adds_it(bpe_folders, style, bos, add_bos):
    folder, tokenizer = bpe_folders[style]
    gguf_path, _ = convert(folder)
    fields = gguf.GGUFReader(gguf_path).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is add_bos
    if bos is not None:
        assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.convert_tokens_to_ids(bos)
    with closing(Llama(str(gguf_path), vocab_only=True, verbose=False)) as llm:
        assert llm.token_eos() == tokenizer.eos_token_id


def test_add_eos_token_is_measured(tmp_path):
    folder = tmp_path / "eos"
    make_spm_tokenizer(folder, "llama2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode("Hello")[-1] == tokenizer.eos_token_id
    gguf_path, _ = convert(folder)
    assert gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.add_eos_token"].contents() is True
    assert mismatches(gguf_path, tokenizer, ["Hello world", "a<s>b"]) == []


def test_legacy_false_warns_about_text_after_special_tokens(tmp_path):
    folder = tmp_path / "first"
    tokenizer = make_spm_tokenizer(folder, "llama2", keep_model_file=False, legacy=False)
    gguf_path, warned = convert(folder)
    assert any("after every special token" in message for message in warned)
    differing = {text for text, *_ in mismatches(gguf_path, tokenizer, TEXTS)}
    assert "<s>[INST] hi [/INST] ok</s>" in differing
    assert all(has_added_token(tokenizer, text) or text.startswith(" ") for text in differing)


def test_vocabulary_is_padded_to_embedding_rows(bpe_folders):
    folder, tokenizer = bpe_folders["smollm"]
    gguf_path, _ = convert(folder, {"vocab_size": len(tokenizer) + 11})
    with closing(Llama(str(gguf_path), vocab_only=True, verbose=False)) as llm:
        assert llm.n_vocab() == len(tokenizer) + 11
    assert mismatches(gguf_path, tokenizer, TEXTS) == []
    types = gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.token_type"].contents()
    assert types[len(tokenizer):] == [gguf.TokenType.UNUSED] * 11


def test_embedding_smaller_than_tokenizer_is_an_input_error(bpe_folders):
    with pytest.raises(InputError, match="embedding"):
        build_vocab(bpe_folders["gpt2"][1], {"vocab_size": 100})


def test_missing_tokenizer_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no tokenizer"):
        add_tokenizer(gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama"), tmp_path, {})


def test_unknown_pre_tokenizer_warns_and_writes_default(bpe_folders):
    tokenizer = train_split_tokenizer((r"[a-z]+|[^a-z]+",), ignore_merges=False, clean_spaces=True)
    with pytest.warns(TokenizerWarning, match="no llama.cpp pre-tokenizer"):
        assert build_vocab(tokenizer, {}).pre == "default"


def test_chat_template_is_written(bpe_folders):
    folder, tokenizer = bpe_folders["llama3"]
    gguf_path, _ = convert(folder)
    assert gguf.GGUFReader(gguf_path).fields["tokenizer.chat_template"].contents() == tokenizer.chat_template


def test_live_tokenizer_writes_the_same_file_as_its_folder(tmp_path, spm_folders, bpe_folders):
    for folder, tokenizer in (spm_folders["llama2", True], bpe_folders["qwen2"]):
        from_folder, _ = convert(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TokenizerWarning)
            from_live = write_vocab_only_gguf(tmp_path / "live.gguf",
                                              lambda writer: add_tokenizer_from_hf(writer, tokenizer, {}))
        assert from_live.read_bytes() == from_folder.read_bytes()


def test_generation_config_supplies_a_missing_eos():
    tokenizer = train_split_tokenizer(PRE_TOKENIZERS[0].regexes, True, True, eos_token=None)
    assert tokenizer.eos_token_id is None
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert build_vocab(tokenizer, {"eos_token_id": 0}, {"eos_token_id": [im_end, 0]}).eos_id == im_end
    assert build_vocab(tokenizer, {"eos_token_id": 0}).eos_id == 0


def test_dev_model_tokenises_like_hf(tmp_path, dev_model):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        if (dev_model / name).is_file():
            shutil.copy(dev_model / name, folder / name)
    config = json.loads((dev_model / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_path, warned = convert(folder, config)
    assert warned == []
    # SmolLM2 splits digits before the GPT-2 regex ("smollm"); a tokenizer.json that lost the Digits step (as one
    # rebuilt from a GGUF by transformers) splits with the GPT-2 regex alone, and "smollm" would then differ
    pre_tokenizer = json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"]
    splits_digits = "Digits" in json.dumps(pre_tokenizer)
    with closing(Llama(str(gguf_path), vocab_only=True, verbose=False)) as llm:
        assert llm.metadata["tokenizer.ggml.pre"] == ("smollm" if splits_digits else "gpt-2")
        assert llm.n_vocab() == config["vocab_size"]
    assert mismatches(gguf_path, tokenizer, TEXTS + SAMPLE_LINES) == []
