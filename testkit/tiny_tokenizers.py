"""Tiny tokenizers trained on the fly, saved in Hugging Face folder layout, for tests and tiny-model fixtures.

Each builder trains a small tokenizer (a few hundred to about a thousand tokens) on SAMPLE_TEXT, writes it into a
folder the way a Hugging Face checkpoint ships it, and returns the tokenizer transformers loads from that folder:

    make_bpe_tokenizer(folder, style)   byte-level BPE in tokenizer.json; style is one of BPE_STYLES
    make_spm_tokenizer(folder, style)   SentencePiece tokenizer.model; style is one of SPM_STYLES; with
                                        keep_model_file=False only the tokenizer.json transformers converts it to is
                                        kept (the TinyLlama / Mistral layout: BPE + byte fallback + Metaspace)

Styles copy the shape of real tokenizers (their pre-tokenizer, special tokens and whether BOS is added), not their
vocabularies. Training is deterministic, so the same style always gives the same vocabulary.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import sentencepiece
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SAMPLE_TEXT = """\
The lighthouse keeper counted the ships every evening. On quiet nights there were twelve, on stormy ones barely
three, and once, in the winter of 1987, there were none at all. She wrote each number in a green notebook that she
kept beside the kettle: 12, 3, 7, 0, 15, 4. Nobody asked her to do it; she simply didn't like forgetting things.
"It's the small records that matter," she'd say. "You'll see. We're all just lists of evenings, aren't we?"
THE HARBOUR MASTER'S OFFICE IS CLOSED ON SUNDAYS. Please use the side door & ring twice!!! Questions? Ask Tom.

def count_ships(log: dict[str, int], threshold: int = 10) -> list[str]:
    \"\"\"Return the evenings with more ships than the threshold.\"\"\"
    busy = [day for day, ships in log.items() if ships > threshold]
    for day in busy:
        print(f"{day}: {log[day]} ships (>{threshold})")
    return sorted(busy)

if __name__ == "__main__":
    result = count_ships({"mon": 12, "tue": 3, "wed": 15}, threshold=4)
    assert result == ["mon", "wed"], result

for (int i = 0; i < n; ++i) { total += values[i] * 0.5f; }  // accumulate, then halve
SELECT name, COUNT(*) AS visits FROM harbour_log WHERE year >= 2019 GROUP BY name ORDER BY visits DESC;
<div class="note">Tide tables: 06:42 high, 12:58 low; 19:07 high.</div>

Prices rose 3.5% in March, from $1,299.99 to $1,345.46; the index stood at 104.7 (2015 = 100).
Call +44 20 7946 0958 or write to keeper@lighthouse.example.org before 31/12/2024.
Coordinates: 51.5074 N, 0.1278 W. Serial numbers: 000123, 4567890, 3141592653589793.

Der Leuchtturmwärter zählte jeden Abend die Schiffe; über Weihnachten kamen kaum welche. Ça va très bien, merci !
El faro está en la costa norte, y la mañana es fría. Zażółć gęślą jaźń. Ølet er kaldt på fjorden.
Смотритель маяка считал корабли каждый вечер. Море было тихим, и ветер стих к полуночи.
灯塔看守人每天晚上都数船。今天有十二艘船，明天可能更多。我们明天见。
灯台守は毎晩、船を数えていました。今日は静かな夜です。
등대지기는 매일 저녁 배를 세었다. 오늘 밤은 조용하다.
حارس المنارة يعد السفن كل مساء. البحر هادئ الليلة.
प्रकाशस्तंभ का रक्षक हर शाम जहाज़ गिनता था। आज रात समुद्र शांत है।
Ο φαροφύλακας μετρούσε τα πλοία κάθε βράδυ. Η θάλασσα ήταν ήρεμη.
ผู้ดูแลประภาคารนับเรือทุกเย็น

Emoji log: 🚢⚓🌊 calm, 🌧️⛈️ storm, 👩🏽‍✈️ pilot on board, ✅ done, 🎉🎉 party at the pier!
Whitespace:  two spaces,   three spaces,\ttab,\t\ttwo tabs,    four spaces
    indented line
\t\tindented with tabs

multiple blank lines above; trailing spaces here   
Mixed: naïve café résumé façade coöperate — “quotes” ‘single’ «guillemets» … ellipsis • bullet → arrow ± ≤ ≥ ≠ ∞ µ ½ ² ³
"""

BPE_STYLES = ("llama3", "qwen2", "smollm", "gpt2")
SPM_STYLES = ("llama2", "gemma")

# The pre-tokenizer regexes of real tokenizer.json files (Llama 3 and Qwen2), written as Oniguruma patterns.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                   "message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
                   "{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + "
                  "message['content'] + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def make_bpe_tokenizer(directory: Path, style: str = "llama3", vocab_size: int = 800) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer shaped like `style`, save it in `directory` and return it loaded from there.

    llama3: Llama 3 split regex, merges ignored for whole-word hits, BOS <|begin_of_text|> added, specials at the end.
    qwen2:  NFC normaliser, Qwen2 split regex (single digits), no BOS, ChatML specials and a non-special added token.
    smollm: individual digits then the GPT-2 regex, no BOS, ChatML specials at ids 0..2.
    gpt2:   the GPT-2 regex only, <|endoftext|> at the end.
    """
    if style not in BPE_STYLES:
        raise ValueError(f"unknown BPE style {style!r}; choose one of {BPE_STYLES}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    leading_specials: list[str] = []
    trailing_specials: list[str] = []
    trailing_plain: list[str] = []
    if style == "llama3":
        tokenizer = Tokenizer(models.BPE(ignore_merges=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
        trailing_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"]
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE,
                  "clean_up_tokenization_spaces": True}
    elif style == "qwen2":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level])
        trailing_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        trailing_plain = ["<tool_call>", "</tool_call>"]
        config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE,
                  "clean_up_tokenization_spaces": False}
    elif style == "smollm":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        leading_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False}
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trailing_specials = ["<|endoftext|>"]
        config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "clean_up_tokenization_spaces": True}
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=leading_specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(SAMPLE_TEXT.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens(trailing_specials)
    tokenizer.add_tokens(trailing_plain)
    if style == "llama3":
        bos_id = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **config)
    hf_tokenizer.save_pretrained(directory)
    _write_special_tokens_map(directory, config)
    return AutoTokenizer.from_pretrained(directory)


def make_spm_tokenizer(directory: Path, style: str = "llama2", vocab_size: int = 1000,
                       keep_model_file: bool = True, legacy: bool = True) -> PreTrainedTokenizerBase:
    """Train a SentencePiece BPE model shaped like `style`, save it in `directory` and return it loaded from there.

    llama2: <unk> <s> </s> at ids 0..2, byte fallback, split digits, a dummy-prefix space, BOS added.
    gemma:  <pad> <eos> <bos> <unk> at ids 0..3, byte fallback, no dummy prefix, turn markers, BOS added.
    keep_model_file=False keeps only the tokenizer.json transformers converts the model to. legacy=False (llama2)
    makes transformers prepend the "▁" only at the start of the text, not after special tokens.
    """
    if style not in SPM_STYLES:
        raise ValueError(f"unknown SentencePiece style {style!r}; choose one of {SPM_STYLES}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    common = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
                  remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
                  character_coverage=0.9995, minloglevel=2, num_threads=1)
    if style == "llama2":
        special = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "add_bos_token": True, "add_eos_token": False, "legacy": legacy, "chat_template": LLAMA2_TEMPLATE}
    else:
        special = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                       bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
                       user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
        config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                  "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>", "add_bos_token": True,
                  "add_eos_token": False, "chat_template": GEMMA_TEMPLATE,
                  "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    sample = directory / "sample.txt"
    sample.write_text(SAMPLE_TEXT, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(sample), model_prefix=str(directory / "tokenizer"),
                                             **common, **special)
    sample.unlink()
    (directory / "tokenizer.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    _write_special_tokens_map(directory, config)
    if keep_model_file:
        return AutoTokenizer.from_pretrained(directory)
    converted = AutoTokenizer.from_pretrained(directory)
    (directory / "tokenizer.model").unlink()
    converted.save_pretrained(directory)
    # save_pretrained drops the flags that decide how the tokenizer class rebuilds its pre-tokenizer on loading
    saved_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    kept = ("legacy", "add_bos_token", "add_eos_token")
    saved_config.update({name: config[name] for name in kept if name in config})
    (directory / "tokenizer_config.json").write_text(json.dumps(saved_config, indent=2), encoding="utf-8")
    _write_special_tokens_map(directory, config)
    return AutoTokenizer.from_pretrained(directory)


def copy_tokenizer(model_dir: Path, directory: Path) -> PreTrainedTokenizerBase:
    """A real model's tokenizer files copied into `directory`, loaded from there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for path in Path(model_dir).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template")):
            shutil.copyfile(path, directory / path.name)
    return AutoTokenizer.from_pretrained(directory)


def _write_special_tokens_map(directory: Path, config: dict) -> None:
    names = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "additional_special_tokens")
    special = {name: config[name] for name in names if name in config}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
