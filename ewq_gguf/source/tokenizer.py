"""Hugging Face tokenizer -> GGUF vocabulary metadata, so that llama.cpp tokenises exactly as the HF tokenizer does.

Two llama.cpp tokenizer models cover the tokenizers we accept:

- "gpt2": byte-level BPE (Llama 3, Qwen2, SmolLM, GPT-2, ...). Tokens and merges come from tokenizer.json; the
  pre-tokenizer name (tokenizer.ggml.pre) is derived from the tokenizer's own split regexes, digit splitting and merge
  settings, matched against the regex lists llama.cpp's src/llama-vocab.cpp uses for each name.
- "llama": SentencePiece BPE (Llama 2, Mistral, Gemma). Pieces, scores and piece types come from tokenizer.model;
  a tokenizer.json-only conversion of such a model (BPE + byte fallback + "▁" spaces) gets scores from its merge
  ranks, which makes llama.cpp's highest-score-first bigram merging pick the same merges as HF's lowest-rank-first.

Everything that depends on behaviour rather than on file contents is measured on the live tokenizer: which tokens
tokenizer(text) adds in front and behind (add_bos / add_eos and the ids actually added), and whether a space is
prepended to the text (add_space_prefix). Differences llama.cpp cannot express are reported as TokenizerWarning.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from ewq_gguf.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPIECE_SPACE = "\u2581"
PROBE_TEXT = "Hello world"


class TokenizerWarning(UserWarning):
    """The GGUF vocabulary makes llama.cpp tokenise some texts differently from the HF tokenizer."""


# Pre-tokenizer regexes as Hugging Face tokenizer.json files write them (Oniguruma syntax). llama.cpp keeps the
# same lists in src/llama-vocab.cpp, with (?i:...) spelled out as character classes because its engine lacks it.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3_REGEX = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                r"|\s+")
JAIS2_REGEX = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
               r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
QWEN2_REGEX = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
               r"|\s+")
QWEN35_REGEX = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
UFAKZEKA_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SEED_CODER_REGEX = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)"
                    r"|\s+")
MINICPM5_REGEX = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                  r"|\s+")
_CASED_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}")
GPT4O_REGEX = (_CASED_WORDS.replace("{c}", "(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
               + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = _CASED_WORDS.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DEEPSEEK_CODER_REGEXES = ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}")
DEEPSEEK_V3_REGEXES = (
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer name and the HF settings that tokenise like it.

    regexes: the split patterns applied in order, each isolating its matches (HF Split behaviour "Isolated");
    ignore_merges: whole pre-tokens found in the vocabulary skip BPE (HF BPE.ignore_merges);
    clean_spaces: detokenisation removes the space before punctuation (HF clean_up_tokenization_spaces); several
    names split identically and differ only here, so it picks among them;
    approximation: how llama.cpp's rewrite of a regex its engine cannot run splits differently, if it does.
    """

    name: str
    regexes: tuple[str, ...]
    ignore_merges: bool = False
    clean_spaces: bool = True
    approximation: str | None = None


CASED_WORDS_APPROXIMATION = ("llama.cpp spells the cased-word classes with look-aheads that leave out combining "
                             "marks (\\p{M}), so words in scripts such as Devanagari or Thai may split differently")

# Preferred name first where several split identically.
PRE_TOKENIZERS = (
    PreTokenizer("llama-bpe", (LLAMA3_REGEX,), ignore_merges=True),
    PreTokenizer("dbrx", (LLAMA3_REGEX,)),
    PreTokenizer("jais-2", (JAIS2_REGEX,)),
    PreTokenizer("qwen2", (QWEN2_REGEX,), clean_spaces=False),
    PreTokenizer("stablelm2", (QWEN2_REGEX,)),
    PreTokenizer("qwen35", (QWEN35_REGEX,), clean_spaces=False),
    PreTokenizer("ufakzeka", (UFAKZEKA_REGEX,), clean_spaces=False),
    PreTokenizer("seed-coder", (SEED_CODER_REGEX,), clean_spaces=False),
    PreTokenizer("minicpm5", (r"\p{N}{1,3}", MINICPM5_REGEX), ignore_merges=True),
    PreTokenizer("smollm", (r"\p{N}", GPT2_REGEX), clean_spaces=False),
    PreTokenizer("starcoder", (r"\p{N}", GPT2_REGEX)),
    PreTokenizer("gpt-2", (GPT2_REGEX,)),
    PreTokenizer("gpt-4o", (GPT4O_REGEX,), clean_spaces=False, approximation=CASED_WORDS_APPROXIMATION),
    PreTokenizer("tekken", (TEKKEN_REGEX,), ignore_merges=True, clean_spaces=False,
                 approximation=CASED_WORDS_APPROXIMATION),
    PreTokenizer("deepseek-coder", DEEPSEEK_CODER_REGEXES, clean_spaces=False),
    PreTokenizer("deepseek-v3", DEEPSEEK_V3_REGEXES, clean_spaces=False),
)
DEFAULT_PRE = "default"


@dataclass
class GgufVocab:
    """Every tokenizer.* value written to the GGUF; ids index `tokens`."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict) -> None:
    """Write the tokenizer of the HF checkpoint folder `model_dir` as tokenizer.* keys onto `writer`."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise InputError(f"no tokenizer in {model_dir}: expected tokenizer.json or tokenizer.model")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # transformers raises many types for unreadable tokenizer files
        raise InputError(f"cannot load the tokenizer in {model_dir}: {error}") from error
    generation_config = _read_json(model_dir / "generation_config.json")
    write_vocab(writer, build_vocab(tokenizer, config, generation_config, _sentencepiece_file(tokenizer, model_dir)))


def add_tokenizer_from_hf(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, config: dict,
                          generation_config: dict | None = None) -> None:
    """Write a live transformers tokenizer as tokenizer.* keys onto `writer`."""
    write_vocab(writer, build_vocab(tokenizer, config, generation_config, _sentencepiece_file(tokenizer, None)))


def build_vocab(tokenizer: PreTrainedTokenizerBase, config: dict, generation_config: dict | None = None,
                sentencepiece_file: Path | None = None) -> GgufVocab:
    """The GGUF vocabulary of `tokenizer`, padded to the model's embedding rows (config vocab_size)."""
    backend = _backend_json(tokenizer)
    model = backend["model"] if backend else None
    if model is not None and model.get("type") != "BPE":
        raise InputError(f"tokenizer model type {model.get('type')!r} is not supported; ewq-gguf writes "
                         "byte-level BPE and SentencePiece BPE tokenizers")
    proto = _load_sentencepiece(sentencepiece_file) if sentencepiece_file is not None else None
    if backend is not None and _is_byte_level(backend):
        vocab = _byte_level_vocab(backend, tokenizer)
    elif proto is not None and _sentencepiece_matches(proto, sentencepiece_file, tokenizer):
        vocab = _sentencepiece_vocab(proto, sentencepiece_file, tokenizer)
    elif backend is not None and _is_sentencepiece_like(backend):
        vocab = _merges_sentencepiece_vocab(backend, tokenizer)
    else:
        raise InputError(f"tokenizer {type(tokenizer).__name__} is neither byte-level BPE nor SentencePiece BPE")
    _pad_to_embedding_rows(vocab, config)
    _check_unique(vocab.tokens)
    _set_special_ids(vocab, tokenizer, config, generation_config or {})
    _warn_on_added_token_flags(tokenizer)
    vocab.chat_template = _chat_template(tokenizer)
    return vocab


def write_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    """Add the tokenizer.* keys of `vocab` to a writer whose header is not yet written."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos_id, writer.add_bos_token_id), (vocab.eos_id, writer.add_eos_token_id),
                          (vocab.unk_id, writer.add_unk_token_id), (vocab.pad_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --- byte-level BPE ("gpt2") ---------------------------------------------------------------------------------------

def _is_byte_level(backend: dict) -> bool:
    return any(step.get("type") == "ByteLevel" for step in _steps(backend.get("pre_tokenizer")))


def _byte_level_vocab(backend: dict, tokenizer: PreTrainedTokenizerBase) -> GgufVocab:
    model = backend["model"]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise InputError("BPE with a continuing-subword prefix or end-of-word suffix is not supported by llama.cpp")
    tokens, token_types = _tokens_from_vocab(model["vocab"], backend)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    normalizer = backend.get("normalizer")
    if normalizer is not None:
        _warn(f"the tokenizer normalises text ({normalizer.get('type')}) before splitting and llama.cpp does not, "
              "so text the normaliser changes (for NFC: decomposed accents) tokenises differently")
    return GgufVocab(model="gpt2", pre=_pre_tokenizer_name(backend, tokenizer), tokens=tokens,
                     token_types=token_types, merges=merges)


def _pre_tokenizer_name(backend: dict, tokenizer: PreTrainedTokenizerBase) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does, or "default" with a warning."""
    if any(step.get("type") == "ByteLevel" and step.get("add_prefix_space")
           for step in _steps(backend.get("pre_tokenizer"))):
        _warn("the tokenizer adds a space in front of the text (ByteLevel add_prefix_space); llama.cpp's BPE does "
              "not, so the first word tokenises differently")
    regexes = _split_regexes(backend.get("pre_tokenizer"))
    if regexes is None:
        _warn(f"unrecognised pre-tokenizer {json.dumps(backend.get('pre_tokenizer'))}; writing "
              f"'{DEFAULT_PRE}', so llama.cpp will split text differently from the HF tokenizer")
        return DEFAULT_PRE
    same_split = [pre for pre in PRE_TOKENIZERS if tuple(map(_canonical_regex, pre.regexes)) == regexes]
    if not same_split:
        _warn(f"no llama.cpp pre-tokenizer splits with {list(regexes)}; writing '{DEFAULT_PRE}', so llama.cpp "
              "will split text differently from the HF tokenizer")
        return DEFAULT_PRE
    ignore_merges = bool(backend["model"].get("ignore_merges", False))
    same_merging = [pre for pre in same_split if pre.ignore_merges == ignore_merges]
    if not same_merging:
        _warn(f"llama.cpp's '{same_split[0].name}' pre-tokenizer has ignore_merges={not ignore_merges}, this "
              f"tokenizer {ignore_merges}; words that are whole vocabulary entries may be split differently")
        same_merging = same_split
    clean_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    same_cleaning = [pre for pre in same_merging if pre.clean_spaces == clean_spaces]
    chosen = (same_cleaning or same_merging)[0]
    if chosen.approximation:
        _warn(f"pre-tokenizer '{chosen.name}': {chosen.approximation}")
    return chosen.name


def _split_regexes(pre_tokenizer: dict | None) -> tuple[str, ...] | None:
    """The isolating split regexes a byte-level pre-tokenizer applies in order; None if it does anything else."""
    regexes = []
    for step in _steps(pre_tokenizer):
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("use_regex", True):
                regexes.append(GPT2_REGEX)
        elif kind == "Digits":
            regexes.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split":
            pattern = step.get("pattern", {})
            if "Regex" not in pattern or step.get("behavior") != "Isolated" or step.get("invert"):
                return None
            regexes.append(pattern["Regex"])
        else:
            return None
    return tuple(map(_canonical_regex, regexes))


def _canonical_regex(regex: str) -> str:
    """Write control characters as escapes so a literal newline and "\\n" in a pattern compare equal."""
    return regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")


# --- SentencePiece BPE ("llama") ----------------------------------------------------------------------------------

def _is_sentencepiece_like(backend: dict) -> bool:
    """BPE over "▁"-escaped text with <0xNN> byte fallback, as transformers converts SentencePiece models."""
    escapes_spaces = any(step.get("type") == "Metaspace" for step in _steps(backend.get("pre_tokenizer"))) or any(
        step.get("type") == "Replace" and step.get("content") == SPIECE_SPACE
        for step in _steps(backend.get("normalizer")))
    return escapes_spaces and bool(backend["model"].get("byte_fallback"))


def _sentencepiece_matches(proto: Any, path: Path, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizer.model holds the pieces the HF tokenizer uses at the same ids (else it is stale)."""
    pieces = [piece.piece for piece in proto.pieces]
    if tokenizer.convert_ids_to_tokens(list(range(len(pieces)))) == pieces:
        return True
    _warn(f"{path} does not match the HF tokenizer's vocabulary; using the HF tokenizer's own files instead")
    return False


def _sentencepiece_vocab(proto: Any, path: Path, tokenizer: PreTrainedTokenizerBase) -> GgufVocab:
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise InputError(f"{path} is a SentencePiece {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)}"
                         " model; only SentencePiece BPE is supported")
    tokens = [piece.piece for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    token_types = [int(piece.type) for piece in proto.pieces]
    added = dict(_added_tokens(tokenizer))
    unmatched = [token for token_id, token in enumerate(tokens)
                 if token_types[token_id] == gguf.TokenType.USER_DEFINED and token_id not in added]
    if unmatched:
        _warn(f"user-defined pieces {unmatched[:5]} are matched whole by SentencePiece and llama.cpp but are not "
              "added tokens of the HF tokenizer, which splits them")
    for token_id, token in added.items():
        while token_id >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(0.0)
            token_types.append(int(gguf.TokenType.UNUSED))
        tokens[token_id] = token.content
        token_types[token_id] = int(gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED)
    return GgufVocab(model="llama", pre=DEFAULT_PRE, tokens=tokens, token_types=token_types, scores=scores,
                     add_space_prefix=_measured_space_prefix(tokenizer))


def _merges_sentencepiece_vocab(backend: dict, tokenizer: PreTrainedTokenizerBase) -> GgufVocab:
    """SentencePiece pieces rebuilt from a converted tokenizer.json: a piece's score is minus the rank of the first
    merge that makes it, so llama.cpp's highest-score bigram first is HF's lowest-rank merge first."""
    model = backend["model"]
    tokens, token_types = _tokens_from_vocab(model["vocab"], backend)
    ids = {token: token_id for token_id, token in enumerate(tokens)}
    byte_piece = re.compile(r"<0x[0-9A-F]{2}>")
    for token_id, token in enumerate(tokens):
        if token_types[token_id] == gguf.TokenType.NORMAL and byte_piece.fullmatch(token):
            token_types[token_id] = int(gguf.TokenType.BYTE)
    unknown = model.get("unk_token") or tokenizer.unk_token
    if unknown in ids:
        token_types[ids[unknown]] = int(gguf.TokenType.UNKNOWN)
    merges = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model.get("merges", [])]
    unmerged = -float(len(merges) + 1)
    scores = [unmerged] * len(tokens)
    made_by_merge = set()
    for rank, (left, right) in enumerate(merges):
        token_id = ids.get(left + right)
        if token_id is not None and token_id not in made_by_merge:
            made_by_merge.add(token_id)
            scores[token_id] = -float(rank)
    unreachable = [token for token_id, token in enumerate(tokens) if len(token) > 1
                   and token_types[token_id] == gguf.TokenType.NORMAL and token_id not in made_by_merge]
    if unreachable:
        _warn(f"{len(unreachable)} multi-character tokens (e.g. {unreachable[:3]}) come from no merge; HF never "
              "produces them, llama.cpp may")
    return GgufVocab(model="llama", pre=DEFAULT_PRE, tokens=tokens, token_types=token_types, scores=scores,
                     add_space_prefix=_measured_space_prefix(tokenizer))


def _measured_space_prefix(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether HF prepends "▁" to the text. llama.cpp then prepends one to every text fragment, also to one that
    already begins with a space and to one that follows a special token; warns where HF does otherwise."""
    prefixed = _space_pieces(tokenizer, "a") == 1
    if not prefixed:
        return False
    if _space_pieces(tokenizer, " a") != 2:
        _warn("the tokenizer prepends no space to a text that already begins with one (Metaspace); llama.cpp and "
              "SentencePiece do, so such texts tokenise differently")
    special = next((token.content for _, token in _added_tokens(tokenizer) if token.special), None)
    if special is not None and _space_pieces(tokenizer, "a", after=special) != 1:
        _warn("the tokenizer prepends a space only at the start of the text (Metaspace prepend_scheme 'first' "
              "or legacy=False); llama.cpp also prepends one after every special token")
    return True


def _space_pieces(tokenizer: PreTrainedTokenizerBase, text: str, after: str = "") -> int:
    """How many "▁" HF puts in front of the first letter of `text` (placed right after the special token `after`)."""
    ids = tokenizer.encode(after + text, add_special_tokens=False)[1 if after else 0:]
    pieces = "".join(tokenizer.convert_ids_to_tokens(ids))
    return len(pieces) - len(pieces.lstrip(SPIECE_SPACE))


def _load_sentencepiece(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as error:  # protobuf's DecodeError and OSError both mean an unusable file
        raise InputError(f"cannot read the SentencePiece model {path}: {error}") from error
    return proto


def _sentencepiece_file(tokenizer: PreTrainedTokenizerBase, model_dir: Path | None) -> Path | None:
    candidates = [Path(model_dir) / "tokenizer.model"] if model_dir is not None else []
    vocab_file = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if isinstance(vocab_file, (str, Path)) and str(vocab_file).endswith(".model"):
        candidates.append(Path(vocab_file))
    return next((path for path in candidates if path.is_file()), None)


# --- shared --------------------------------------------------------------------------------------------------------

def _tokens_from_vocab(model_vocab: dict[str, int], backend: dict) -> tuple[list[str], list[int]]:
    """Token texts and types by id from a tokenizer.json vocabulary and its added tokens; gaps become unused."""
    by_id = {token_id: token for token, token_id in model_vocab.items()}
    types = {token_id: gguf.TokenType.NORMAL for token_id in by_id}
    for added in backend.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(token_id, f"[PAD{token_id}]") for token_id in range(size)]
    token_types = [int(types.get(token_id, gguf.TokenType.UNUSED)) for token_id in range(size)]
    return tokens, token_types


def _added_tokens(tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, Any]]:
    return sorted(tokenizer.added_tokens_decoder.items())


def _warn_on_added_token_flags(tokenizer: PreTrainedTokenizerBase) -> None:
    """Added tokens are matched in raw text before tokenising, like llama.cpp's control and user-defined tokens;
    their lstrip/rstrip/single_word flags have no GGUF key."""
    flagged = [token.content for _, token in _added_tokens(tokenizer)
               if token.lstrip or token.rstrip or token.single_word]
    if flagged:
        _warn(f"added tokens {flagged} strip neighbouring spaces or match single words only in HF; llama.cpp "
              "matches them as plain text")


def _set_special_ids(vocab: GgufVocab, tokenizer: PreTrainedTokenizerBase, config: dict,
                     generation_config: dict) -> None:
    """bos/eos/unk/pad ids, and add_bos/add_eos as tokenizer(text) actually applies them."""
    sources = (generation_config, config)
    vocab.bos_id = _first_id(tokenizer.bos_token_id, *(source.get("bos_token_id") for source in sources))
    vocab.eos_id = _first_id(tokenizer.eos_token_id, *(source.get("eos_token_id") for source in sources))
    vocab.unk_id = _first_id(tokenizer.unk_token_id)
    vocab.pad_id = _first_id(tokenizer.pad_token_id, config.get("pad_token_id"))
    plain = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    framed = tokenizer.encode(PROBE_TEXT, add_special_tokens=True)
    start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i:i + len(plain)] == plain), None)
    if start is None:
        _warn("with special tokens the tokenizer splits the text itself differently; taking add_bos_token and "
              "add_eos_token from its settings")
        vocab.add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and vocab.bos_id is not None
        vocab.add_eos = bool(getattr(tokenizer, "add_eos_token", False)) and vocab.eos_id is not None
    else:
        prefix, suffix = framed[:start], framed[start + len(plain):]
        vocab.add_bos, vocab.bos_id = _added_special("BOS", prefix, vocab.bos_id, kept=prefix[0] if prefix else None)
        vocab.add_eos, vocab.eos_id = _added_special("EOS", suffix, vocab.eos_id, kept=suffix[-1] if suffix else None)
    for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
        token_id = getattr(vocab, name)
        if token_id is not None and not 0 <= token_id < len(vocab.tokens):
            _warn(f"{name} {token_id} is outside the vocabulary of {len(vocab.tokens)} tokens; not written")
            setattr(vocab, name, None)


def _added_special(name: str, added: list[int], declared: int | None, kept: int | None) -> tuple[bool, int | None]:
    """(add flag, id) for the tokens HF adds on one side of the text; llama.cpp adds at most one there, `kept`
    (the one at the outer edge)."""
    if kept is None:
        return False, declared
    if len(added) > 1:
        _warn(f"the tokenizer adds {len(added)} tokens where llama.cpp adds only the {name} token {kept}")
    if declared is not None and declared != kept:
        _warn(f"the tokenizer declares {name} id {declared} but adds id {kept}; writing {kept}")
    return True, kept


def _first_id(*candidates: Any) -> int | None:
    for candidate in candidates:
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
    return None


def _pad_to_embedding_rows(vocab: GgufVocab, config: dict) -> None:
    """llama.cpp needs one token per embedding row; HF checkpoints often pad the embedding beyond the tokenizer."""
    rows = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    if rows is None:
        return
    if len(vocab.tokens) > rows:
        raise InputError(f"the tokenizer has {len(vocab.tokens)} tokens but the model's embedding only {rows} rows")
    for token_id in range(len(vocab.tokens), rows):
        vocab.tokens.append(f"[PAD{token_id}]")
        vocab.token_types.append(int(gguf.TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(0.0)


def _check_unique(tokens: list[str]) -> None:
    seen: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if token in seen:
            raise InputError(f"token {token!r} appears at ids {seen[token]} and {token_id}; llama.cpp needs every "
                             "token text once")
        seen[token] = token_id


def _chat_template(tokenizer: PreTrainedTokenizerBase) -> str | list[dict[str, str]] | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None


def _backend_json(tokenizer: PreTrainedTokenizerBase) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _steps(component: dict | None) -> list[dict]:
    """The flat list of steps of a tokenizer.json normalizer or pre_tokenizer (Sequence or single)."""
    if component is None:
        return []
    if component.get("type") == "Sequence":
        children = component.get("pretokenizers", component.get("normalizers", []))
        return [step for child in children for step in _steps(child)]
    return [component]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path}: {error}") from error


def _warn(message: str) -> None:
    warnings.warn(message, TokenizerWarning, stacklevel=3)
