"""VALIDATE: perplexity and KL divergence match direct numpy computations on llama.cpp logits; the base-logits cache
is reused and invalidated when it must be; bad inputs give one clear error; the CLI commands."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from llama_cpp import Llama

from ewq_gguf.cli import main
from ewq_gguf.errors import EwqGgufError, InputError
from ewq_gguf.gguf_file import read_gguf
from ewq_gguf.text import DEFAULT_TEXT_CANDIDATES, load_text
from ewq_gguf.validate import compare, format_compare_table, perplexity, plot_size_vs_kld
from ewq_gguf.validate.logits_cache import base_logits
from ewq_gguf.validate.scoring import BaseScores, EncodedLogProbs, score_against_base, score_base

CTX = 64
CHUNKS = 4
THREADS = 1  # the test model is tiny: extra threads only spin, and cost seconds on a busy machine


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """The first 20 KB of the real English text found on this machine (never shipped with the project)."""
    try:
        text = load_text(None)
    except InputError as exc:
        pytest.skip(str(exc))
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(text.content[:20_000], encoding="utf-8")
    return path


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def _header_edit(source: Path, target: Path, find: bytes, offset_after: int, new_bytes: bytes) -> Path:
    """Copy `source` to `target`, overwriting bytes at (first occurrence of `find`) + offset_after."""
    data = bytearray(source.read_bytes())
    at = data.index(find) + offset_after
    data[at:at + len(new_bytes)] = new_bytes
    target.write_bytes(bytes(data))
    return target


def flipped_add_bos_copy(source: Path, target: Path) -> Path:
    key = b"tokenizer.ggml.add_bos_token"
    current = bool(GGUFReader(source).fields[key.decode()].contents())
    return _header_edit(source, target, key, len(key) + 4, bytes([not current]))


def renamed_token_copy(source: Path, target: Path) -> Path:
    """A copy whose vocabulary differs in one token's text (same length, so the file stays valid)."""
    tokens = read_gguf(source).tokens
    token = next(t for t in tokens[300:] if t.isascii() and t.isalpha() and len(t) >= 3 and t[:-1] + "Q" not in tokens)
    encoded = token.encode()
    serialized = struct.pack("<Q", len(encoded)) + encoded
    return _header_edit(source, target, serialized, len(serialized) - 1, b"Q")


def reference_chunks(path: Path, text_path: Path, ctx: int, chunks: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per chunk: float64 log-softmax of the scored rows and their target tokens, computed independently from
    llama-cpp-python's high-level API (all logits), the GGUF's add_bos flag read by gguf-py, and numpy."""
    add_bos = bool(GGUFReader(path).fields["tokenizer.ggml.add_bos_token"].contents())
    # Flash attention on: llama.cpp's default ("auto") turns it on for the CPU, in llama-perplexity and in ours.
    llm = Llama(str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, flash_attn=True, verbose=False, n_gpu_layers=0,
                n_threads=THREADS, n_threads_batch=THREADS)
    try:
        tokens = llm.tokenize(text_path.read_bytes(), add_bos=add_bos, special=False)
        result = []
        for index in range(chunks):
            chunk = list(tokens[index * ctx:(index + 1) * ctx])
            targets = np.array(chunk[ctx // 2 + 1:])
            if add_bos:
                chunk[0] = llm.token_bos()
            llm.reset()
            llm.eval(chunk)
            logits = np.array(llm.scores[ctx // 2:ctx - 1], dtype=np.float64)
            log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            result.append((log_probs, targets))
        return result
    finally:
        llm.close()


def reference_perplexity(chunks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    nll = np.concatenate([-log_probs[np.arange(len(targets)), targets] for log_probs, targets in chunks])
    ppl = np.exp(nll.mean())
    return ppl, ppl * nll.std() / np.sqrt(len(nll) - 1)


# ---------------------------------------------------------------------------------------------- perplexity


def test_perplexity_equals_numpy_on_llama_cpp_logits(tiny_gguf, text_file):
    report = perplexity(tiny_gguf("F32"), text=text_file, ctx=CTX, chunks=CHUNKS, threads=THREADS, gpu_layers=0,
                        progress=False)
    expected_ppl, expected_se = reference_perplexity(reference_chunks(tiny_gguf("F32"), text_file, CTX, CHUNKS))
    assert report.ppl == pytest.approx(expected_ppl, rel=1e-6)
    assert report.ppl_se == pytest.approx(expected_se, rel=1e-5)
    assert report.tokens == CHUNKS * (CTX - 1 - CTX // 2)
    assert report.chunks == CHUNKS and report.evaluated_tokens == CHUNKS * CTX
    assert report.bytes == tiny_gguf("F32").stat().st_size
    assert report.bpw == pytest.approx(32.0)
    assert set(report.to_dict()) == {"file", "bytes", "bpw", "ppl", "ppl_se", "tokens", "seconds"}


def test_bos_follows_the_gguf_add_bos_flag(tiny_gguf, text_file, tmp_path):
    flipped = flipped_add_bos_copy(tiny_gguf("F32"), tmp_path / "flipped.gguf")
    with_flag = perplexity(tiny_gguf("F32"), text=text_file, ctx=CTX, chunks=2, threads=THREADS, gpu_layers=0,
                           progress=False)
    without_flag = perplexity(flipped, text=text_file, ctx=CTX, chunks=2, threads=THREADS, gpu_layers=0,
                              progress=False)
    expected_ppl, _ = reference_perplexity(reference_chunks(flipped, text_file, CTX, 2))
    assert without_flag.ppl == pytest.approx(expected_ppl, rel=1e-6)
    assert without_flag.ppl != pytest.approx(with_flag.ppl, rel=1e-6)


def test_all_chunks_by_default(tiny_gguf, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(text_file.read_text()[:3000], encoding="utf-8")
    report = perplexity(tiny_gguf("F32"), text=short, ctx=CTX, threads=THREADS, progress=False)
    n_tokens = len(Llama(str(tiny_gguf("F32")), vocab_only=True, verbose=False).tokenize(short.read_bytes()))
    assert report.chunks == n_tokens // CTX > 2


# ---------------------------------------------------------------------------------------------- KL divergence


def test_compare_a_file_with_itself_is_exactly_zero(tiny_gguf, text_file, cache_dir):
    base, same = compare(tiny_gguf("F32"), [tiny_gguf("F32")], text=text_file, ctx=CTX, chunks=CHUNKS,
                         cache_dir=cache_dir, threads=THREADS, progress=False)
    assert base.is_base and not same.is_base
    assert (same.kld, same.kld_se, same.kld_p99, same.top1) == (0.0, 0.0, 0.0, 1.0)
    assert same.ppl == base.ppl


def test_kld_q8_0_against_f32_matches_float64_numpy(tiny_gguf, text_file, cache_dir):
    _, q8 = compare(tiny_gguf("F32"), [tiny_gguf("Q8_0")], text=text_file, ctx=CTX, chunks=CHUNKS,
                    cache_dir=cache_dir, threads=THREADS, gpu_layers=0, progress=False)
    base_chunks = reference_chunks(tiny_gguf("F32"), text_file, CTX, CHUNKS)
    candidate_chunks = reference_chunks(tiny_gguf("Q8_0"), text_file, CTX, CHUNKS)
    kld = np.concatenate([(np.exp(p) * (p - q)).sum(axis=1) for (p, _), (q, _) in zip(base_chunks, candidate_chunks)])
    same_top1 = np.concatenate([p.argmax(axis=1) == q.argmax(axis=1)
                                for (p, _), (q, _) in zip(base_chunks, candidate_chunks)])
    assert 0 < q8.kld < 0.05
    assert q8.kld == pytest.approx(kld.mean(), rel=0.02, abs=1e-5)
    assert q8.kld_se == pytest.approx(kld.std() / np.sqrt(len(kld) - 1), rel=0.05)
    assert q8.kld_p99 == pytest.approx(np.percentile(kld, 99), rel=0.05)
    assert q8.top1 == pytest.approx(same_top1.mean())
    assert q8.ppl == pytest.approx(reference_perplexity(candidate_chunks)[0], rel=1e-6)
    assert q8.bytes < tiny_gguf("F32").stat().st_size
    assert set(q8.to_dict()) == {"file", "bytes", "bpw", "ppl", "ppl_se", "kld", "kld_se", "kld_p99", "top1",
                                 "tokens", "seconds"}


def test_compact_log_probs_keep_kl_within_rounding():
    """Without llama.cpp: rounding onto the uint16 grid (step 16/65535 nats) moves each token's KL by less than a step
    and leaves the mean over tokens within 1%; a distribution compared with itself gives exactly 0."""
    rng = np.random.default_rng(0)
    base_logits_rows = rng.normal(0, 3, size=(40, 3000)).astype(np.float32)
    candidate = base_logits_rows + rng.normal(0, 0.05, size=base_logits_rows.shape).astype(np.float32)
    targets = rng.integers(0, 3000, size=40)
    base = BaseScores(EncodedLogProbs(np.empty(base_logits_rows.shape, np.uint16), np.empty(40, np.float32),
                                      np.empty(40, np.float32)), np.empty(40), np.empty(40, dtype=np.int64))
    score_base(base_logits_rows, targets, base)
    encoded = base.log_probs
    scores = score_against_base(candidate, targets, encoded, base.top1)
    p = base_logits_rows.astype(np.float64)
    p -= np.logaddexp.reduce(p, axis=1, keepdims=True)
    q = candidate.astype(np.float64)
    q -= np.logaddexp.reduce(q, axis=1, keepdims=True)
    exact = (np.exp(p) * (p - q)).sum(axis=1)
    np.testing.assert_allclose(scores.kld, exact, rtol=0, atol=16 / 65535)
    assert scores.kld.mean() == pytest.approx(exact.mean(), rel=0.01)
    np.testing.assert_allclose(scores.nll, -q[np.arange(40), targets], rtol=1e-6)
    np.testing.assert_allclose(base.nll, -p[np.arange(40), targets], rtol=1e-6)
    np.testing.assert_array_equal(base.top1, base_logits_rows.argmax(axis=1))
    self_scores = score_against_base(base_logits_rows, targets, encoded, base.top1)
    assert not self_scores.kld.any() and self_scores.same_top1.all()
    np.testing.assert_array_equal(self_scores.nll, base.nll)


# ---------------------------------------------------------------------------------------------- cache


def test_base_logits_cache_is_reused_and_invalidated(tiny_gguf, text_file, tmp_path, cache_dir):
    base = tmp_path / "base.gguf"
    shutil.copyfile(tiny_gguf("F32"), base)

    def cached(text=text_file, ctx=CTX, chunks=3):
        return base_logits(read_gguf(base), load_text(text), ctx, chunks, cache_dir=cache_dir, threads=THREADS,
                           progress=False)

    first = cached()
    assert not first.reused and first.n_chunks == 3
    codes_before = np.array(first.codes[:3])
    assert cached().reused
    assert cached(chunks=2).reused, "fewer chunks are a prefix of the cached ones"
    again = cached()
    np.testing.assert_array_equal(np.asarray(again.codes[:3]), codes_before)
    assert not cached(chunks=4).reused, "more chunks than cached"
    assert not cached(ctx=CTX * 2).reused, "ctx changed"
    other_text = tmp_path / "other.txt"
    other_text.write_text(text_file.read_text()[1000:], encoding="utf-8")
    assert not cached(text=other_text).reused, "text changed"
    assert cached(text=other_text).reused
    stat = base.stat()
    os.utime(base, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not cached(text=other_text).reused, "base file touched"
    assert len(list(cache_dir.iterdir())) == 1, "one entry per base file"


# ---------------------------------------------------------------------------------------------- bad input


def test_not_a_gguf(tmp_path, text_file):
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model\n" * 10)
    with pytest.raises(InputError, match="not a GGUF"):
        perplexity(fake, text=text_file, progress=False)


@pytest.mark.parametrize("fraction", [0.001, 0.7])
def test_truncated_gguf(tiny_gguf, tmp_path, text_file, fraction):
    data = tiny_gguf("F32").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError, match="truncated"):
        perplexity(truncated, text=text_file, progress=False)


def test_llama_cpp_load_failure_gives_its_reason(tiny_gguf, tmp_path, text_file):
    data = tiny_gguf("F32").read_bytes()
    architecture_value = data.index(b"llama", data.index(b"general.architecture"))
    unknown = tmp_path / "unknown-architecture.gguf"
    unknown.write_bytes(data[:architecture_value] + b"llamx" + data[architecture_value + 5:])
    with pytest.raises(InputError, match="unknown model architecture: 'llamx'"):
        perplexity(unknown, text=text_file, progress=False)


def test_missing_gguf(tmp_path, text_file):
    with pytest.raises(InputError, match="no such file"):
        perplexity(tmp_path / "absent.gguf", text=text_file, progress=False)


def test_empty_text(tiny_gguf, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        perplexity(tiny_gguf("F32"), text=empty, ctx=CTX, progress=False)


def test_text_shorter_than_two_contexts(tiny_gguf, tmp_path, text_file):
    short = tmp_path / "short.txt"
    short.write_text(text_file.read_text()[:200])
    with pytest.raises(InputError, match=r"at least 1024 \(2 x ctx\)"):
        perplexity(tiny_gguf("F32"), text=short, ctx=512, progress=False)


def test_missing_text_file(tiny_gguf, tmp_path):
    with pytest.raises(InputError, match="not found"):
        perplexity(tiny_gguf("F32"), text=tmp_path / "absent.txt", progress=False)


def test_no_default_text(monkeypatch, tmp_path):
    monkeypatch.setattr("ewq_gguf.text.DEFAULT_TEXT_CANDIDATES", (tmp_path / "absent.txt.gz",))
    with pytest.raises(InputError, match="--text"):
        load_text(None)


def test_default_text_is_named(tiny_gguf):
    present = next((path for path in DEFAULT_TEXT_CANDIDATES if path.is_file()), None)
    if present is None:
        pytest.skip("no default text on this machine")
    report = perplexity(tiny_gguf("F32"), ctx=CTX, chunks=1, threads=THREADS, progress=False)
    assert report.text == str(present)


def test_vocabulary_mismatch(tiny_gguf, tmp_path, text_file, cache_dir):
    other = renamed_token_copy(tiny_gguf("F32"), tmp_path / "other-vocab.gguf")
    assert perplexity(other, text=text_file, ctx=CTX, chunks=1, threads=THREADS, progress=False).ppl > 0
    with pytest.raises(InputError, match="vocabulary"):
        compare(tiny_gguf("F32"), [other], text=text_file, ctx=CTX, chunks=1, cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("options, message", [({"ctx": 4}, "too small"), ({"chunks": 0}, "at least 1")])
def test_bad_options(tiny_gguf, text_file, options, message):
    with pytest.raises(InputError, match=message):
        perplexity(tiny_gguf("F32"), text=text_file, progress=False, **options)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_perplexity_json(tiny_gguf, text_file):
    result = CliRunner().invoke(main, ["perplexity", str(tiny_gguf("F32")), "--text", str(text_file), "--ctx",
                                       str(CTX), "--chunks", "2", "--threads", str(THREADS), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"file", "bytes", "bpw", "ppl", "ppl_se", "tokens", "seconds"}
    assert report["tokens"] == 2 * (CTX - 1 - CTX // 2)


def test_cli_compare_table_and_json(tiny_gguf, text_file, tmp_path):
    arguments = ["compare", str(tiny_gguf("F32")), str(tiny_gguf("Q8_0")), "--text", str(text_file), "--ctx",
                 str(CTX), "--chunks", "2", "--threads", str(THREADS), "--cache-dir", str(tmp_path / "cache")]
    table = CliRunner().invoke(main, arguments)
    assert table.exit_code == 0, table.output
    assert "tiny-Q8_0.gguf" in table.stdout and "KLD" in table.stdout
    as_json = CliRunner().invoke(main, [*arguments, "--json"])
    reports = json.loads(as_json.stdout)
    assert [Path(r["file"]).name for r in reports] == ["tiny-F32.gguf", "tiny-Q8_0.gguf"]
    assert reports[0]["kld"] == 0.0 and reports[1]["kld"] > 0


def test_cli_bad_input_is_one_line(tmp_path, text_file):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"nope")
    result = CliRunner().invoke(main, ["perplexity", str(fake), "--text", str(text_file)])
    assert result.exit_code == InputError.exit_code
    assert result.stderr.strip().count("\n") == 0 and "not a GGUF" in result.stderr


def test_plot_or_a_clear_message_without_matplotlib(tiny_gguf, text_file, cache_dir, tmp_path):
    reports = compare(tiny_gguf("F32"), [tiny_gguf("Q8_0")], text=text_file, ctx=CTX, chunks=1, cache_dir=cache_dir,
                      threads=THREADS, progress=False)
    png = tmp_path / "size-vs-kld.png"
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(EwqGgufError, match="pip install matplotlib"):
            plot_size_vs_kld(reports, png)
    else:
        assert plot_size_vs_kld(reports, png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_fails_before_any_work(tiny_gguf, tmp_path):
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed")
    result = CliRunner().invoke(main, ["compare", str(tiny_gguf("F32")), str(tiny_gguf("Q8_0")), "--plot",
                                       str(tmp_path / "plot.png"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == EwqGgufError.exit_code and "pip install matplotlib" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_format_compare_table_has_a_row_per_file(tiny_gguf, text_file, cache_dir):
    reports = compare(tiny_gguf("F32"), [tiny_gguf("Q8_0")], text=text_file, ctx=CTX, chunks=1, cache_dir=cache_dir,
                      threads=THREADS, progress=False)
    lines = format_compare_table(reports).splitlines()
    assert len(lines) == 2 + len(reports)
    assert "(base)" in lines[2]
