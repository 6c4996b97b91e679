"""Writing a GGUF file, or llama.cpp's split parts, so that a final name only ever holds a complete, checked file.

Each part is written under a unique temporary name beside its final one: first the header (gguf_file.header), then,
once the free space is known to hold the rest, the tensors in plan order as encode.py produces them. The parts are
flushed to disk, re-read with the project's GGUF header reader and checked against the plan (verify), and each is
renamed onto its final name in one step; without --force a final name that appeared meanwhile (another conversion to
the same OUT) is left alone, so two conversions never mix their bytes. Ctrl-C and SIGTERM (signals.py) and write
errors remove the temporaries.
"""
from __future__ import annotations

import errno
import importlib.metadata
import inspect
import os
import re
import shutil
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import gguf
import numpy as np
import torch

from ..errors import EwqGgufError, InputError, OutputError
from ..gguf_file.header import add_header, file_size
from ..plan import Plan
from ..progress import progress_bar
from ..source.model import SourceModel
from ..timing import StageTimes
from .encode import EncodedTensors
from .signals import SignalGuard


@dataclass(frozen=True)
class WrittenFile:
    """A finished output: `path` is the file to load (the first part of a split), `bytes` the size of all parts."""

    path: Path
    bytes: int
    parts: tuple[Path, ...] = ()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: int | str) -> int:
    """Bytes from an int or text like '2G', '500M', '1.5G' (decimal units, as llama.cpp's gguf-split reads them)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise InputError(f"size '{size}' is not a number of bytes with an optional K, M, G or T suffix")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise InputError(f"size '{size}' must be positive")
    return value


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputError(f"{out} exists (use --force to overwrite)")
    if out.is_dir():
        raise OutputError(f"{out} is a folder")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable")


class _Consulted(Exception):
    """Raised by the probe of _gguf_writer_problem when gguf-py asks it for the names of the files to open."""


def _gguf_writer_problem() -> Optional[str]:
    """What of gguf-py's GGUFWriter internals _PartsWriter relies on is missing or changed; None if nothing.

    _PartsWriter overrides format_shard_names, which gguf-py must consult before it opens any file (otherwise the
    output would be written straight onto its final names), and reads path, fout, tensors (TensorInfo.nbytes),
    data_alignment, split_max_size and ggml_pad: a probe writer shows all of them at work."""

    class Probe(gguf.GGUFWriter):
        def format_shard_names(self, path: Path) -> list[Path]:
            raise _Consulted

    try:
        if list(inspect.signature(gguf.GGUFWriter.format_shard_names).parameters) != ["self", "path"]:
            return "GGUFWriter.format_shard_names does not take (self, path)"
        # the null device: a gguf-py that opened files without consulting format_shard_names would write nothing
        probe = Probe(os.devnull, "llama", split_max_size=1 << 20)
        probe.add_tensor_info("probe", [8], np.dtype(np.float32), 32)
        checks = [("path", probe.path, Path(os.devnull)), ("fout", probe.fout, None),
                  ("split_max_size", probe.split_max_size, 1 << 20),
                  ("data_alignment", probe.data_alignment, gguf.GGUF_DEFAULT_ALIGNMENT),
                  ("tensors[-1]['probe'].nbytes", probe.tensors[-1]["probe"].nbytes, 32),
                  ("ggml_pad(33, 32)", probe.ggml_pad(33, 32), 64)]
        wrong = [f"{name} is {found!r}, expected {value!r}" for name, found, value in checks if found != value]
        if wrong:
            return "GGUFWriter's " + "; ".join(wrong)
        try:
            probe.open_output_file()
        except _Consulted:
            return None
        finally:
            probe.close()
        return "GGUFWriter opens its files without asking format_shard_names for their names"
    except Exception as exc:  # whatever a changed gguf-py raises on the probe tells what changed
        return f"{type(exc).__name__}: {exc}"


class _PartsWriter(gguf.GGUFWriter):
    """gguf-py's writer, splitting as llama.cpp's gguf-split does (OUT-00001-of-0000N.gguf, split.* keys in every
    part), with each part written under a unique temporary name beside its final one."""

    def __init__(self, out: Path, arch: str, split_max_size: int):
        problem = _gguf_writer_problem()
        if problem:
            raise EwqGgufError(f"ewq-gguf's writer does not work with the installed gguf "
                               f"{importlib.metadata.version('gguf')}: {problem}")
        super().__init__(out, arch, split_max_size=split_max_size)
        self.token = uuid.uuid4().hex[:12]

    def final_paths(self) -> list[Path]:
        return super().format_shard_names(self.path)

    def format_shard_names(self, path: Path) -> list[Path]:
        return [final.with_name(f".{final.name}.{self.token}.partial") for final in self.final_paths()]

    def remaining_bytes(self) -> int:
        """Bytes still to be written after the headers, with the alignment padding before and between tensors."""
        remaining = 0
        for fout, tensors in zip(self.fout or [], self.tensors):
            written = fout.tell()
            remaining += file_size(written, (info.nbytes for info in tensors.values()), self.data_alignment) - written
        return remaining


def write_gguf(model: SourceModel, plan: Plan, out: str | Path, *, force: bool = False,
               device: torch.device = torch.device("cpu"), importance: Optional[dict[str, torch.Tensor]] = None,
               progress: bool = True, split_max_size: Optional[int | str] = None,
               times: Optional[StageTimes] = None, encoded: Optional[dict[str, np.ndarray]] = None) -> WrittenFile:
    """Write `model` as `plan` says to `out`; returns where the finished file (or files) lie and their size.

    split_max_size: tensor bytes per file (int, or text like '2G'); above it the output is split into llama.cpp's
    OUT-00001-of-0000N.gguf parts, which llama.cpp loads from the first. A model that fits stays one file, OUT.
    encoded: tensors already encoded (name -> (rows, row bytes) uint8, e.g. GPTQ-rounded), written as they are.
    """
    out = Path(out)
    check_output(out, force)
    times = StageTimes() if times is None else times
    # encoding starts now, while the header (the tokenizer's vocabulary above all) is built
    with closing(EncodedTensors(model, plan, device, importance or {}, times, encoded)) as tensors:
        writer = _PartsWriter(out, model.adapter.arch_name, parse_size(split_max_size) if split_max_size else 0)
        add_header(writer, model, plan)
        if len(writer.tensors) == 1:
            writer.split_max_size = 0   # fits in one file; gguf-py would log a warning about not splitting
        finals, temps = writer.final_paths(), writer.format_shard_names(out)
        for final in finals:
            check_output(final, force)
        _write_parts(writer, plan, out, finals, temps, tensors, progress, times, force)
    return WrittenFile(finals[0], sum(final.stat().st_size for final in finals), tuple(finals))


def _write_parts(writer: "_PartsWriter", plan: Plan, out: Path, finals: Sequence[Path], temps: Sequence[Path],
                 tensors: EncodedTensors, progress: bool, times: StageTimes, force: bool) -> None:
    """Write the temporaries, check them and put them in place; the temporaries go on any failure."""
    with SignalGuard().active() as signals:
        try:
            _stream(writer, plan, out.parent, tensors, progress, signals, times)
            with times.measure("verify"):
                verify(temps, plan)
            signals.check()
            signals.hold()
            _put_in_place(temps, finals, force)
        except OSError as exc:
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
        finally:
            signals.hold()      # a second Ctrl-C must not stop the clean-up half way
            writer.close()
            for temp in temps:
                temp.unlink(missing_ok=True)


def _stream(writer: "_PartsWriter", plan: Plan, folder: Path, tensors: EncodedTensors, progress: bool,
            signals: SignalGuard, times: StageTimes) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    needed, free = writer.remaining_bytes(), shutil.disk_usage(folder).free
    if free < needed:
        whole = needed + sum(fout.tell() for fout in writer.fout or [])
        raise OutputError(f"not enough free space in {folder}: the output takes {whole / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free")
    bar = progress_bar(total=plan.tensor_bytes, desc="writing", unit="B", unit_scale=True, enabled=progress)
    with bar:
        for tensor_bytes in tensors:
            signals.check()
            with times.measure("write"):
                writer.write_tensor_data(tensor_bytes)
            bar.update(tensor_bytes.nbytes)
    with times.measure("write"):
        for fout in writer.fout or []:
            fout.flush()
            os.fsync(fout.fileno())     # a full disk or an I/O error shows here, before the file is put in place
    writer.close()


def _put_in_place(temps: Sequence[Path], finals: Sequence[Path], force: bool) -> None:
    """Rename each verified temporary onto its final name, each in one step.

    Without --force a final name that appeared while writing (another conversion to the same OUT) is not replaced:
    a hard link creates a name only if it is free; where the file system has no hard links, a check and a rename.
    """
    if force:
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
        return
    placed: list[Path] = []
    try:
        for temp, final in zip(temps, finals):
            try:
                os.link(temp, final)
                temp.unlink()
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                    raise
                if final.exists():
                    raise FileExistsError(errno.EEXIST, "exists", str(final)) from exc
                os.replace(temp, final)
            placed.append(final)
    except FileExistsError as exc:
        for final in placed:
            final.unlink(missing_ok=True)
        raise OutputError(f"{exc.filename} appeared while this conversion was writing (another conversion to the "
                          "same output?); it was left as it is (use --force to overwrite)") from None


def verify(paths: Path | Sequence[Path], plan: Plan) -> None:
    """Re-read the written file (or every part of a split) and check each tensor's name, type and size against the
    plan, that all tensor data the header promises is in the file, and a split's split.* keys against its parts.

    The header is parsed with the project's GGUF header reader (gguf_file.read), not gguf-py's GGUFReader: the
    latter builds a numpy view per vocabulary entry and costs seconds on every conversion for the same check.
    """
    from ..gguf_file import read_gguf

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: dict[str, tuple[gguf.GGMLQuantizationType, int]] = {}
    for number, path in enumerate(paths):
        try:
            header = read_gguf(path)
        except InputError as exc:
            raise OutputError(f"the written file does not read back as GGUF ({exc})") from exc
        if len(paths) > 1:
            split = [header.metadata.get(key) for key in (gguf.Keys.Split.LLM_KV_SPLIT_NO,
                                                           gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
                                                           gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)]
            if split != [number, len(paths), len(plan.entries)]:
                raise OutputError(f"part {number + 1} of the split output has wrong split keys {split}")
        for tensor in header.tensors:
            if tensor.name in found:
                raise OutputError(f"the written files hold tensor '{tensor.name}' twice")
            found[tensor.name] = (tensor.type, tensor.n_bytes)
    for entry in plan.entries:
        if found.get(entry.name) != (entry.type, entry.nbytes):
            raise OutputError(f"the written file does not match the plan at tensor '{entry.name}'")
    if len(found) != len(plan.entries):
        raise OutputError("the written file holds tensors the plan does not name")
