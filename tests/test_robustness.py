"""Hostile inputs are refused before anything is written; interruptions, full disks and races leave no partial file;
split output loads in llama.cpp like the single file.

Every refusal goes through the CLI and checks the whole contract: a non-zero exit, one `error:` line naming the
problem, no traceback, and an output folder as empty as it started.
"""
from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ewq_gguf.write.encode as encode_module
import ewq_gguf.write.file as write_module
from ewq_gguf.api import convert
from ewq_gguf.constants import KEY_EWQ_PLAN
from ewq_gguf.errors import InputError, OutputError
from ewq_gguf.plan import Plan
from ewq_gguf.quant import CODECS, row_nbytes
from ewq_gguf.write import parse_size
from llama_runner import gguf_logits, relative_error
from test_convert import CliResult, run_cli
from testkit.tiny_models import make_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::ewq_gguf.source.tokenizer.TokenizerWarning")

TOKENS = [(7 * i + 3) % 200 + 5 for i in range(40)]


# --- helpers -----------------------------------------------------------------------------------------------------

def rewrite_safetensors(path: Path, edit: Optional[Callable[[dict], None]] = None, *,
                        declared_length: Optional[int] = None, tail: bytes = b"") -> None:
    """Rewrite a .safetensors file with its JSON header edited, its length prefix replaced, or bytes appended."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    if edit is not None:
        edit(header)
    text = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(text) if declared_length is None else declared_length)
    path.write_bytes(prefix + text + data + tail)


def assert_refused(result: CliResult, out_dir: Path, message: str) -> None:
    """Non-zero exit, exactly one error line containing `message`, no traceback, nothing left in out_dir."""
    assert result.returncode != 0, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(out_dir.iterdir()) == []


def tensors_of(paths: list[Path]) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for path in paths for t in gguf.GGUFReader(path).tensors}


@pytest.fixture
def model_copy(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sharded"), max_shard_size="300KB")


@pytest.fixture
def sharded_copy(sharded_llama, tmp_path) -> Path:
    return Path(shutil.copytree(sharded_llama, tmp_path / "sharded"))


def edit_index(model: Path, edit: Callable[[dict], None]) -> None:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))


# --- pickle checkpoints ------------------------------------------------------------------------------------------

def to_pickle(model: Path, shards: int = 1) -> None:
    """Replace the safetensors weights by pytorch_model*.bin made with torch.save, as older checkpoints ship."""
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    if shards == 1:
        torch.save(state, model / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for number in range(shards):
        file = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[number::shards]}
        torch.save(part, model / file)
        weight_map.update(dict.fromkeys(part, file))
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_pickle_checkpoint_refused_by_default(model_copy, out_dir):
    to_pickle(model_copy)
    assert_refused(run_cli("convert", model_copy, out_dir / "m.gguf", "--type", "Q8_0"), out_dir, "--allow-pickle")


@pytest.mark.parametrize("shards", [1, 3])
def test_allow_pickle_gives_the_safetensors_tensors(tiny_llama, tiny_gguf, tmp_path, out_dir, shards):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "pickled"))
    to_pickle(model, shards)
    out = out_dir / "m.gguf"
    result = run_cli("convert", model, out, "--type", "Q8_0", "--allow-pickle", "--quiet")
    assert result.returncode == 0, result.stderr
    assert tensors_of([out]) == tensors_of([tiny_gguf("Q8_0")])


def test_allow_pickle_still_refuses_code(model_copy, out_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save({**state, "payload": Payload()}, model_copy / "pytorch_model.bin")
    result = run_cli("convert", model_copy, out_dir / "m.gguf", "--type", "Q8_0", "--allow-pickle")
    assert_refused(result, out_dir, "weights-only")
    assert not marker.exists()


# --- shards that lead out of the folder --------------------------------------------------------------------------

def test_index_shard_with_dotdot_refused(sharded_copy, out_dir, tmp_path):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0]
    outside = tmp_path / shard.name
    shutil.copy(shard, outside)
    edit_index(sharded_copy, lambda weight_map: weight_map.update(
        {name: f"../{shard.name}" for name, file in weight_map.items() if file == shard.name}))
    assert_refused(run_cli("convert", sharded_copy, out_dir / "m.gguf"), out_dir, "outside the model folder")


def test_index_shard_with_absolute_path_refused(sharded_copy, out_dir):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0]
    edit_index(sharded_copy, lambda weight_map: weight_map.update(
        {name: str(shard) for name, file in weight_map.items() if file == shard.name}))
    assert_refused(run_cli("convert", sharded_copy, out_dir / "m.gguf"), out_dir, "outside the model folder")


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_weights_symlinked_out_of_the_folder_refused(sharded_copy, model_copy, out_dir, tmp_path, layout):
    model = sharded_copy if layout == "sharded" else model_copy
    weights = sorted(model.glob("model*.safetensors"))[-1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    weights.rename(elsewhere / weights.name)
    weights.symlink_to(elsewhere / weights.name)
    assert_refused(run_cli("convert", model, out_dir / "m.gguf"), out_dir, "leads outside the model folder")


def test_hugging_face_cache_symlinks_accepted(sharded_llama, tmp_path, out_dir):
    """A hub cache snapshot holds symlinks to ../../blobs/<hash>; that is the one way out that is allowed."""
    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(sharded_llama.iterdir())):
        shutil.copy(file, blobs / f"blob{number}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{number}")
    out = out_dir / "m.gguf"
    result = run_cli("convert", snapshot, out, "--type", "F32", "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(gguf.GGUFReader(out).tensors) > 0


# --- lying safetensors headers -----------------------------------------------------------------------------------

def first_two_same_size(header: dict) -> tuple[str, str]:
    names = [name for name in header if name != "__metadata__"]
    for a in names:
        for b in names:
            if a != b and header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]:
                return a, b
    raise AssertionError("no two tensors of one shape")


def overlap(header: dict) -> None:
    a, b = first_two_same_size(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def beyond_the_end(header: dict) -> None:
    name = next(name for name in header if name != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 2**40, end + 2**40]


def wrong_size(header: dict) -> None:
    name = next(name for name in header if name != "__metadata__")
    header[name]["data_offsets"][1] -= 4


def huge_shape(header: dict) -> None:
    name = next(name for name in header if name != "__metadata__")
    header[name]["shape"] = [2**39, 2**39]


@pytest.mark.parametrize("edit, message", [
    (overlap, "overlap"),
    (beyond_the_end, "truncated file"),
    (wrong_size, "do not match its shape"),
    (huge_shape, "do not match its shape"),
])
def test_lying_offsets_refused(model_copy, out_dir, edit, message):
    rewrite_safetensors(model_copy / "model.safetensors", edit)
    assert_refused(run_cli("convert", model_copy, out_dir / "m.gguf"), out_dir, message)


def test_bytes_outside_every_tensor_refused(model_copy, out_dir):
    rewrite_safetensors(model_copy / "model.safetensors", tail=b"\0" * 64)
    assert_refused(run_cli("convert", model_copy, out_dir / "m.gguf"), out_dir, "belong to no tensor")


@pytest.mark.parametrize("declared", [2**63, 2**40, 100_000_001])
def test_huge_header_length_refused(model_copy, out_dir, declared):
    rewrite_safetensors(model_copy / "model.safetensors", declared_length=declared)
    assert_refused(run_cli("convert", model_copy, out_dir / "m.gguf"), out_dir, f"declares {declared} header bytes")


def test_tensor_in_two_shards_refused(sharded_copy, out_dir):
    first, second = sorted(sharded_copy.glob("model-*.safetensors"))[:2]
    first_state, second_state = load_file(first), load_file(second)
    taken = next(iter(first_state))
    save_file({**second_state, taken: first_state[taken]}, second, metadata={"format": "pt"})
    assert_refused(run_cli("convert", sharded_copy, out_dir / "m.gguf"), out_dir, "stored twice")


# --- plans naming a type we cannot encode ------------------------------------------------------------------------

ENCODED = "(it encodes " + ", ".join(sorted(qtype.name for qtype in CODECS)) + ")"


@pytest.mark.parametrize("dry_run", [True, False])
def test_plan_with_a_type_we_cannot_encode_refused(tiny_llama, out_dir, tmp_path, dry_run):
    plan = convert(tiny_llama, out_dir / "m.gguf", type="Q8_0", dry_run=True, progress=False).plan.to_dict()
    entry = next(entry for entry in plan["entries"] if entry["name"] == "blk.0.ffn_down.weight")
    entry["requested"] = entry["type"] = "IQ2_XS"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--plan", tmp_path / "plan.json",
                     *(["--dry-run"] if dry_run else []))
    assert_refused(result, out_dir, f"plan.json: tensor 'blk.0.ffn_down.weight' has type IQ2_XS, which ewq-gguf "
                                    f"cannot encode {ENCODED}")


def test_types_copied_from_a_gguf_we_cannot_encode_refused(tiny_llama, tiny_gguf, out_dir, tmp_path):
    """--plan published.gguf, where the published file stores a tensor as IQ2_XS."""
    published = tmp_path / "published.gguf"
    writer = gguf.GGUFWriter(published, "llama")
    for tensor in gguf.GGUFReader(tiny_gguf("Q8_0")).tensors:
        data, qtype = np.asarray(tensor.data), tensor.tensor_type
        if tensor.name == "blk.0.ffn_down.weight":
            qtype = gguf.GGMLQuantizationType.IQ2_XS
            data = np.zeros((data.shape[0], row_nbytes(qtype, int(tensor.shape[0]))), dtype=np.uint8)
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--plan", published, "--dry-run")
    assert_refused(result, out_dir, f"published.gguf: tensor 'blk.0.ffn_down.weight' has type IQ2_XS, which "
                                    f"ewq-gguf cannot encode {ENCODED}")


# --- write failures ----------------------------------------------------------------------------------------------

def fail_after(monkeypatch, writes: int, failure: Callable[[], None]) -> None:
    """Make gguf-py's tensor write call `failure` once `writes` tensors have been written."""
    original = gguf.GGUFWriter.write_tensor_data
    count = [0]

    def write_tensor_data(self, tensor, *args, **kwargs):
        count[0] += 1
        if count[0] > writes:
            failure()
        return original(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)


def disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("split", [None, "500K"])
def test_disk_full_leaves_nothing(tiny_llama, out_dir, monkeypatch, split):
    fail_after(monkeypatch, 8, disk_full)
    args = ["--split-max-size", split] if split else []
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--type", "Q8_0", "--quiet", *args)
    assert_refused(result, out_dir, "No space left on device")
    assert result.returncode == 3


def test_free_space_counts_the_whole_file(tiny_llama, out_dir, monkeypatch):
    dry = convert(tiny_llama, out_dir / "m.gguf", type="Q8_0", dry_run=True, progress=False)
    free = [dry.plan.tensor_bytes + 1]    # room for the tensors but not the metadata (vocabulary, plan)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(write_module.shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=free[0]))
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--type", "Q8_0", "--quiet")
    assert_refused(result, out_dir, f"the output takes {dry.bytes / 1e9:.2f} GB")
    free[0] = dry.bytes
    assert run_cli("convert", tiny_llama, out_dir / "m.gguf", "--type", "Q8_0", "--quiet").returncode == 0
    assert (out_dir / "m.gguf").stat().st_size == dry.bytes


@pytest.fixture
def sigint_handled():
    """SIGINT raises KeyboardInterrupt during the test, whatever pytest was started with: a test suite run as a
    background job inherits SIGINT ignored, and the writer rightly leaves an ignored signal ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def sigint_ignored():
    """SIGINT ignored during the test, as in a process started by `cmd &` from a script or by nohup."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_writing_removes_the_temporaries(tiny_llama, out_dir, monkeypatch, sigint_handled):
    fail_after(monkeypatch, 5, lambda: signal.raise_signal(signal.SIGINT))
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--type", "Q8_0", "--quiet", "--split-max-size", "500K")
    assert_refused(result, out_dir, "interrupted by SIGINT; nothing was written")
    assert result.returncode == 128 + signal.SIGINT


def test_signal_while_putting_in_place_waits_for_the_files(tiny_llama, out_dir, monkeypatch, sigint_handled):
    """Ctrl-C during the renames is held until every part is in place, then raised as usual."""
    original = write_module._put_in_place

    def put_in_place(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(write_module, "_put_in_place", put_in_place)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama, out_dir / "m.gguf", type="Q8_0", split_max_size="500K", progress=False)
    parts = sorted(out_dir.iterdir())
    assert [p.name for p in parts] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    write_module.verify(parts, convert(tiny_llama, out_dir / "x.gguf", type="Q8_0", dry_run=True, progress=False).plan)


@pytest.mark.parametrize("stage", ["writing", "putting in place"])
def test_signal_ignored_at_start_stays_ignored(tiny_llama, out_dir, monkeypatch, sigint_ignored, stage):
    """A conversion started with SIGINT ignored is neither interrupted by one nor raises it again at the end, and
    leaves it ignored."""
    if stage == "writing":
        fail_after(monkeypatch, 5, lambda: signal.raise_signal(signal.SIGINT))
    else:
        original = write_module._put_in_place

        def put_in_place(*args, **kwargs):
            signal.raise_signal(signal.SIGINT)
            return original(*args, **kwargs)

        monkeypatch.setattr(write_module, "_put_in_place", put_in_place)
    result = convert(tiny_llama, out_dir / "m.gguf", type="Q8_0", split_max_size="500K", progress=False)
    parts = sorted(out_dir.iterdir())
    assert [p.name for p in parts] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    write_module.verify(parts, result.plan)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# --- a gguf-py whose writer changed -------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["format_shard_names takes other arguments", "files named without asking"])
def test_a_changed_gguf_writer_is_refused_before_writing(tiny_llama, out_dir, monkeypatch, change):
    """The writer overrides gguf-py's format_shard_names to write under temporary names; a gguf-py that calls it
    otherwise, or names its files without it (which would write straight onto OUT), is refused up front."""
    if change == "format_shard_names takes other arguments":
        monkeypatch.setattr(gguf.GGUFWriter, "format_shard_names", lambda self, path, count: [path])
    else:
        monkeypatch.setattr(gguf.GGUFWriter, "print_plan",
                            lambda self: gguf.GGUFWriter.format_shard_names(self, self.path))
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--type", "Q8_0", "--quiet")
    assert_refused(result, out_dir, f"ewq-gguf's writer does not work with the installed gguf "
                                    f"{importlib.metadata.version('gguf')}: ")
    assert result.returncode == 1


# --- SIGTERM from outside, and two conversions at once --------------------------------------------------------------

@pytest.fixture(scope="module")
def medium_llama(tmp_path_factory) -> Path:
    """~26M parameters: its Q8_0 write lasts long enough to be interrupted from outside."""
    return make_tiny_model(tmp_path_factory.mktemp("medium"), hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=8)


def start_convert(model: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ewq_gguf", "convert", str(model), str(out), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_mid_write_leaves_nothing(medium_llama, out_dir):
    process = start_convert(medium_llama, out_dir / "m.gguf", "--type", "Q8_0")
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in out_dir.iterdir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert_refused(CliResult(process.returncode, stdout, stderr), out_dir, "interrupted by SIGTERM")


@pytest.mark.parametrize("force", [True, False])
def test_two_converts_to_one_output(tiny_llama, out_dir, monkeypatch, force):
    """Two conversions write the same OUT at once; both have their whole file written before either puts it in
    place (a barrier holds them), so the renames really race. One valid file is left, and without --force the
    second is refused rather than replacing the first's file."""
    barrier = threading.Barrier(2, timeout=60)
    original = write_module._put_in_place

    def put_in_place(*args, **kwargs):
        barrier.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(write_module, "_put_in_place", put_in_place)
    out = out_dir / "m.gguf"
    outcomes: list[object] = []

    def run(type_name: str) -> None:
        try:
            outcomes.append(convert(tiny_llama, out, type=type_name, force=force, progress=False))
        except OutputError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run, args=(type_name,)) for type_name in ("Q8_0", "F16")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    failures = [outcome for outcome in outcomes if isinstance(outcome, OutputError)]
    assert len(outcomes) == 2 and len(failures) == (0 if force else 1), outcomes
    if failures:
        assert "appeared while this conversion was writing" in str(failures[0])
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]
    reader = gguf.GGUFReader(out)
    write_module.verify(out, Plan.from_dict(json.loads(reader.fields[KEY_EWQ_PLAN].contents())))


# --- split output ------------------------------------------------------------------------------------------------

def test_split_output_loads_like_the_single_file(tiny_llama, tiny_gguf, out_dir):
    result = convert(tiny_llama, out_dir / "m.gguf", type="Q8_0", split_max_size="500K", progress=False)
    parts = sorted(out_dir.iterdir())
    assert [p.name for p in parts] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert result.path == parts[0] and result.bytes == sum(p.stat().st_size for p in parts)
    single = tiny_gguf("Q8_0")
    assert tensors_of(parts) == tensors_of([single])
    for number, part in enumerate(parts):
        fields = gguf.GGUFReader(part).fields
        assert fields["split.no"].contents() == number and fields["split.count"].contents() == 4
        assert sum(int(t.n_bytes) for t in gguf.GGUFReader(part).tensors) <= 500_000
    assert relative_error(gguf_logits(parts[0], TOKENS), gguf_logits(single, TOKENS)) == 0.0


@pytest.mark.parametrize("part", [1, 4])
def test_split_refuses_existing_parts_without_force(tiny_llama, out_dir, part):
    taken = out_dir / f"m-{part:05d}-of-00004.gguf"
    taken.write_bytes(b"precious")
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--type", "Q8_0", "--split-max-size", "500K")
    assert result.returncode == 3 and f"{taken.name} exists" in result.stderr
    assert [p.name for p in out_dir.iterdir()] == [taken.name] and taken.read_bytes() == b"precious"


def test_split_that_fits_one_file_writes_out(tiny_llama, out_dir):
    convert(tiny_llama, out_dir / "m.gguf", type="Q8_0", split_max_size="2G", progress=False)
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]
    assert "split.count" not in gguf.GGUFReader(out_dir / "m.gguf").fields


@pytest.mark.parametrize("text, size", [("2G", 2 * 10**9), ("500M", 500 * 10**6), ("1.5k", 1500), ("64KB", 64000),
                                        ("12345", 12345), (4096, 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2X", "", "-1G", "0", "G"])
def test_parse_size_refuses(text):
    with pytest.raises(InputError, match="size"):
        parse_size(text)


def test_bad_split_size_refused_before_reading(tiny_llama, out_dir):
    result = run_cli("convert", tiny_llama, out_dir / "m.gguf", "--split-max-size", "2X")
    assert_refused(result, out_dir, "size '2X'")


def test_encode_tensor_rows_in_chunks_match_one_pass(monkeypatch):
    """A tensor larger than one chunk is encoded chunk by chunk into one buffer, byte-identical to a single pass."""
    rows = torch.randn(300, 256)
    whole = encode_module.encode_tensor(rows, gguf.GGMLQuantizationType.Q8_0, "t", torch.device("cpu"))
    monkeypatch.setattr(encode_module, "CHUNK_ELEMENTS", 256 * 7)
    chunked = encode_module.encode_tensor(rows, gguf.GGMLQuantizationType.Q8_0, "t", torch.device("cpu"))
    assert chunked.dtype == np.uint8 and np.array_equal(whole, chunked)
