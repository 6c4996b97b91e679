"""Validated safetensors headers: every length, offset and shape is checked against the file before any read.

A header is untrusted input (checkpoints come from the internet): a lying length or offset must give an InputError,
never a huge allocation or a read past the end of the file.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100_000_000   # the safetensors library's own limit


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives, from its file's header: nothing of its data has been read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int
    offset: int = 0      # where its data starts in the file (safetensors); 0 for pickled tensors

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorRecord], dict[str, str]]:
    """Tensor records (in file order) and the free-form __metadata__ of one .safetensors file.

    Besides each tensor's own offsets and shape, the data section must be tiled exactly as the format requires:
    tensors back to back from byte 0 to the end, none overlapping another, no gap, nothing after the last.
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise InputError(f"{path.name}: corrupt safetensors header (declares {header_len} header bytes, "
                                 f"file has {file_size})")
            raw = handle.read(header_len)
    except OSError as exc:
        raise InputError(f"{path.name}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path.name}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    data_size = file_size - 8 - header_len
    metadata = header.pop("__metadata__", None) or {}
    spans: list[tuple[int, int, TensorRecord]] = []
    for name, entry in header.items():
        begin, end = _offsets_of(entry, name, path)
        spans.append((begin, end, _record(name, entry, begin, end, path, data_size, 8 + header_len)))
    spans.sort(key=lambda span: (span[0], span[1]))
    _check_tiling(spans, data_size, path)
    return {record.name: record for _, _, record in spans}, metadata if isinstance(metadata, dict) else {}


def _offsets_of(entry: object, name: str, path: Path) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
        raise InputError(f"{path.name}: corrupt safetensors header (tensor '{name}' has no valid data_offsets)")
    return offsets[0], offsets[1]


def _record(name: str, entry: dict, begin: int, end: int, path: Path, data_size: int,
            data_start: int) -> TensorRecord:
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(f"{path.name}: tensor '{name}' has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(v) is int and 0 <= v < 2**40 for v in shape)):
        raise InputError(f"{path.name}: corrupt safetensors header (tensor '{name}' has shape {shape!r})")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if not 0 <= begin <= end or end - begin != nbytes:
        raise InputError(f"{path.name}: corrupt safetensors header (tensor '{name}' offsets {begin}..{end} do not "
                         f"match its shape {shape} of {dtype})")
    if end > data_size:
        raise InputError(f"{path.name}: truncated file (tensor '{name}' ends at byte {end} of the data section, "
                         f"which has only {data_size} bytes)")
    return TensorRecord(name, dtype, tuple(shape), path, nbytes, data_start + begin)


def _check_tiling(spans: list[tuple[int, int, TensorRecord]], data_size: int, path: Path) -> None:
    """Offsets sorted by start must run back to back over the whole data section (what safetensors itself demands);
    overlapping tensors would let one lying header alias the bytes of another."""
    position, previous = 0, None
    for begin, end, record in spans:
        if begin < position:
            raise InputError(f"{path.name}: corrupt safetensors header (tensors '{previous}' and '{record.name}' "
                             f"overlap at bytes {begin}..{min(end, position)})")
        if begin > position:
            raise InputError(f"{path.name}: corrupt safetensors header ({begin - position} bytes before tensor "
                             f"'{record.name}' belong to no tensor)")
        position, previous = end, record.name
    if position != data_size:
        raise InputError(f"{path.name}: corrupt safetensors header ({data_size - position} bytes after the last "
                         "tensor belong to no tensor)")
