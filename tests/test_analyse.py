"""ANALYSE: matrix entropies and ZD against direct float64 numpy, block aggregation, the Analysis JSON, the CLI."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ewq_gguf.analyse import Analysis, analyze, histogram_entropy, softmax_entropy, zd_score
from ewq_gguf.analyse import entropy as entropy_module
from ewq_gguf.analyse.analysis import block_matrices
from ewq_gguf.analyse.zd import zd_threshold
from ewq_gguf.cli import main
from ewq_gguf.errors import InputError
from ewq_gguf.quant import native_backend
from ewq_gguf.source.model import open_checkpoint


def direct_softmax_entropy(values: np.ndarray) -> float:
    w = values.astype(np.float64).ravel()
    p = np.exp(w - w.max())
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def direct_histogram_bits(values: np.ndarray) -> float:
    w = values.astype(np.float64).ravel()
    counts, _ = np.histogram(w, bins=128, range=(w.min(), w.max()))
    p = counts[counts > 0] / w.size
    return float(-(p * np.log2(p)).sum())


def direct_zd(matrices: list[np.ndarray]) -> float:
    w = np.concatenate([m.astype(np.float64).ravel() for m in matrices])
    z = (w - w.mean()) / w.std()
    return float((z > 1).mean())


@pytest.fixture
def weights() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(96, 160, generator=generator) * 0.05 + 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_softmax_entropy_matches_numpy(weights, dtype):
    tensor = weights.to(dtype)
    expected = direct_softmax_entropy(tensor.float().numpy())
    assert softmax_entropy(tensor) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("piece_elements", [0, 64])
def test_chunks_and_pieces_do_not_change_results(weights, monkeypatch, piece_elements):
    """Pieces of a common divisor of the matrix sizes, and chunks that straddle matrix boundaries, give the direct
    results (the default layout here: 960-element pieces, one per chunk; with 64: 17 pieces a chunk)."""
    other = weights[:40, :72] * 3 - 0.2
    monkeypatch.setattr(entropy_module, "CHUNK_ELEMENTS", 1100)
    layout = entropy_module.BlockLayout([weights, other], piece_elements)
    assert layout.piece == (piece_elements or 960)      # gcd(96 x 160, 40 x 72) = 960
    assert all(span.start % layout.piece == 0 == (span.stop - span.start) % layout.piece
               for spans in layout.chunks for span in spans)
    if piece_elements:
        assert any(len(spans) == 2 for spans in layout.chunks)      # the end of one matrix and the start of the other
    names = ["a", "b"]
    moments = entropy_module.block_moments(layout, names)
    threshold = zd_threshold(moments)
    first, second = entropy_module.block_entropies(layout, names, moments, threshold)
    assert first.softmax == pytest.approx(direct_softmax_entropy(weights.numpy()), rel=1e-12)
    assert second.softmax == pytest.approx(direct_softmax_entropy(other.numpy()), rel=1e-12)
    assert first.histogram == pytest.approx(direct_histogram_bits(weights.numpy()), rel=1e-12)
    assert second.histogram == pytest.approx(direct_histogram_bits(other.numpy()), rel=1e-12)
    above = first.above_threshold + second.above_threshold
    assert above / (weights.numel() + other.numel()) == pytest.approx(
        direct_zd([weights.numpy(), other.numpy()]), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_value_counts_give_the_general_routes_results(weights, dtype):
    """16-bit blocks are measured from value counts: the same bins and counts as the two passes over the elements
    (which float32 copies take), the same sums to rounding."""
    block = [weights.to(dtype), (weights[:40, :72] * 3 - 0.2).to(dtype)]
    names = ["first", "second"]
    assert entropy_module.ValueCounts.applies(block)
    assert not entropy_module.ValueCounts.applies([tensor.float() for tensor in block])
    counted = entropy_module.block_statistics(block, names, zd_threshold)
    passes = entropy_module.block_statistics([tensor.float() for tensor in block], names, zd_threshold)
    for by_counts, by_passes in zip(counted, passes):
        assert by_counts.histogram == by_passes.histogram
        assert by_counts.above_threshold == by_passes.above_threshold > 0
        assert by_counts.softmax == pytest.approx(by_passes.softmax, rel=1e-13)


@pytest.mark.skipif(not native_backend.available(), reason="the native extension is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_pattern_counts_are_torchs(weights, dtype, monkeypatch):
    values = torch.cat([weights.reshape(-1), torch.tensor([0.0, -0.0, float("inf"), -float("inf")])]).to(dtype)
    native = entropy_module.ValueCounts([values]).counts
    monkeypatch.setattr(native_backend, "available", lambda: False)
    assert torch.equal(native, entropy_module.ValueCounts([values]).counts)
    assert native.sum() == values.numel()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_value_counts_name_a_non_finite_matrix(weights, bad):
    broken = weights.to(torch.bfloat16)
    broken[3, 4] = bad
    with pytest.raises(InputError, match="'second'"):
        entropy_module.block_statistics([weights.to(torch.bfloat16), broken], ["first", "second"])


def test_largest_divisor():
    assert entropy_module.largest_divisor(110592, 65536) == 55296
    assert entropy_module.largest_divisor(97, 64) == 1
    assert entropy_module.largest_divisor(4096, 65536) == 4096


@pytest.mark.parametrize("value", [0.0, 0.37, -3.0, 1000.0])
def test_softmax_entropy_of_constant_matrix_is_log_n(value):
    tensor = torch.full((48, 64), value)
    assert softmax_entropy(tensor) == pytest.approx(math.log(48 * 64), rel=1e-12)


def test_softmax_entropy_is_stable_for_large_values():
    """exp(1000) overflows; the max-shifted form does not. One dominant element gives entropy near 0."""
    tensor = torch.zeros(32, 32, dtype=torch.float64)
    tensor[3, 4] = 1000.0
    assert softmax_entropy(tensor) == pytest.approx(0.0, abs=1e-100)
    tensor[5, 6] = 1000.0
    assert softmax_entropy(tensor) == pytest.approx(math.log(2), rel=1e-12)


def test_histogram_entropy_matches_numpy(weights):
    assert histogram_entropy(weights) == pytest.approx(direct_histogram_bits(weights.numpy()), rel=1e-12)


def test_histogram_entropy_known_values():
    assert histogram_entropy(torch.full((8, 8), 2.5)) == 0.0
    two_values = torch.tensor([[0.0, 1.0] * 16] * 4)
    assert histogram_entropy(two_values) == pytest.approx(1.0, rel=1e-12)
    # one element per bin: 128 equally likely bins = 7 bits
    evenly = torch.linspace(0.0, 1.0, 128, dtype=torch.float64).reshape(2, 64) + 1e-9
    assert histogram_entropy(evenly) == pytest.approx(7.0, rel=1e-12)


def test_zd_matches_numpy(weights):
    other = torch.distributions.StudentT(3.0).sample((64, 160)) * 0.02
    expected = direct_zd([weights.numpy(), other.numpy()])
    assert zd_score([weights, other]) == pytest.approx(expected, abs=1e-12)
    assert 0.05 < expected < 0.3


def test_block_entropy_is_parameter_weighted_mean(tiny_llama):
    analysis = analyze(tiny_llama, device="cpu", progress=False)
    model = open_checkpoint(tiny_llama)
    blocks = block_matrices(model)
    assert analysis.n_blocks == len(blocks) == 2
    for block in analysis.blocks:
        matrices = [model.load(spec).float().numpy() for spec in blocks[block.index]]
        sizes = np.array([m.size for m in matrices], dtype=np.float64)
        softmax = np.array([direct_softmax_entropy(m) for m in matrices])
        histogram = np.array([direct_histogram_bits(m) for m in matrices])
        assert block.params == sizes.sum()
        assert block.softmax == pytest.approx((softmax * sizes).sum() / sizes.sum(), rel=1e-12)
        normalised = softmax / np.log(sizes)
        assert block.softmax_normalized == pytest.approx((normalised * sizes).sum() / sizes.sum(), rel=1e-12)
        assert block.histogram == pytest.approx((histogram * sizes).sum() / sizes.sum(), rel=1e-12)
        assert block.zd == pytest.approx(direct_zd(matrices), abs=1e-12)
        assert [m["name"] for m in block.matrices] == [spec.name for spec in blocks[block.index]]


def test_analysis_json_round_trip(tiny_llama, tmp_path):
    analysis = analyze(tiny_llama, device="cpu", progress=False)
    path = tmp_path / "analysis.json"
    analysis.save(path)
    again = Analysis.load(path)
    assert again == analysis
    assert np.array_equal(again.scores("histogram"), analysis.scores("histogram"))
    analysis.check_matches(open_checkpoint(tiny_llama))


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ('{"format": 99, "blocks": []}', "analysis format"),
    ('{"format": 1, "model": "m", "architecture": "llama", "n_blocks": 2, "blocks": []}', "numbered"),
])
def test_malformed_analysis_is_an_input_error(text, message):
    with pytest.raises(InputError, match=message):
        Analysis.from_json(text)


def test_nan_weight_named(tiny_llama, tmp_path, monkeypatch):
    model = open_checkpoint(tiny_llama)
    original = model.load

    def load_with_nan(spec):
        tensor = original(spec)
        if spec.name == "blk.1.ffn_up.weight":
            tensor = tensor.clone()
            tensor[2, 3] = float("nan")
        return tensor

    monkeypatch.setattr(model, "load", load_with_nan)
    with pytest.raises(InputError, match="blk.1.ffn_up.weight"):
        analyze(model, device="cpu", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_cuda_agree(tiny_llama):
    cpu = analyze(tiny_llama, device="cpu", progress=False)
    cuda = analyze(tiny_llama, device="cuda", progress=False)
    assert cuda.device.startswith("cuda")
    for a, b in zip(cpu.blocks, cuda.blocks):
        for statistic in ("softmax", "softmax_normalized", "histogram", "zd"):
            assert getattr(b, statistic) == pytest.approx(getattr(a, statistic), rel=1e-6), statistic
    generator = torch.Generator().manual_seed(3)
    big = (torch.randn(3000, 2900, generator=generator) * 0.03).to(torch.bfloat16)   # several chunks
    assert softmax_entropy(big.cuda()) == pytest.approx(softmax_entropy(big), rel=1e-9)
    assert histogram_entropy(big.cuda()) == histogram_entropy(big)
    assert zd_score([big.cuda()]) == zd_score([big])


def test_cli_analyze_table_and_json(tiny_llama, tmp_path):
    out = tmp_path / "analysis.json"
    result = CliRunner().invoke(main, ["analyze", str(tiny_llama), "--device", "cpu", "--json", str(out), "--quiet",
                                       "--entropy", "histogram"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["block", "params", "softmax", "H", "H/log", "n", "hist", "bits", "z(histogram)", "ZD",
                                "tier", "type"]
    saved = Analysis.load(out)
    histogram = saved.scores("histogram")
    low_block = int(np.argmin(histogram))
    row = lines[1 + low_block].split()
    assert row[0] == str(low_block) and row[-2:] == ["LOW", "Q4_K"]   # 2 blocks: the lower one is LOW
    assert json.loads(out.read_text())["format"] == 1


def test_cli_analyze_plot(tiny_llama, tmp_path):
    png = tmp_path / "blocks.png"
    result = CliRunner().invoke(main, ["analyze", str(tiny_llama), "--device", "cpu", "--plot", str(png), "--quiet"])
    if importlib.util.find_spec("matplotlib") is None:
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines()[-1] == (
            "error: --plot needs matplotlib, which is not installed (pip install matplotlib)")
    else:
        assert result.exit_code == 0, result.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
