"""The project's one GGUF reader: the header (metadata, tensor table) of any GGUF file, ours or anyone's.

Validation, the check of every written file, inspect, plan reuse (--plan FILE.gguf) and importance matrices all read
through it. gguf-py's GGUFReader builds a numpy view for every array element (seconds for a 49k-token vocabulary);
this reader walks the header once with struct, decodes a metadata array only when it is asked for, and checks that
the tensor data the header promises is really in the file, so a truncated download fails here with a clear message
instead of inside llama.cpp.
"""
from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, Keys

from ewq_gguf.errors import InputError

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types (gguf.constants.GGUFValueType): id -> struct format of one scalar.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # GGUF order: the row length first
    type: GGMLQuantizationType
    n_elements: int
    n_bytes: int
    offset: int                 # from the start of the tensor data

    @property
    def type_name(self) -> str:
        return self.type.name


@dataclass(frozen=True)
class MetadataArray:
    """Where an array value lies in the header, for GgufFile.value to decode on request (a vocabulary's arrays hold
    10^5 entries that most readers never look at)."""

    element_type: int
    count: int
    start: int                  # header offset of the first element


@dataclass
class GgufFile:
    """A GGUF header: every metadata key in file order (arrays as MetadataArray), tensor infos, where the data lies."""

    path: Path
    file_size: int
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    header: bytes = field(repr=False)
    header_sha256: str
    vocab_sha256: str

    def value(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key, an array decoded to a list; `default` when the file has no such key."""
        value = self.metadata.get(key, default)
        if not isinstance(value, MetadataArray):
            return value
        cursor = _Cursor(self.header, value.start)
        return [cursor.value(value.element_type) for _ in range(value.count)]

    @cached_property
    def tokens(self) -> list[str]:
        return self.value(Keys.Tokenizer.LIST, [])

    @property
    def architecture(self) -> str:
        return str(self.metadata.get(Keys.General.ARCHITECTURE, "unknown"))

    @property
    def bits_per_weight(self) -> float:
        """Bits of tensor data per parameter, over every tensor in the file (norms included, like llama.cpp's BPW)."""
        n_elements = sum(t.n_elements for t in self.tensors)
        return 8.0 * sum(t.n_bytes for t in self.tensors) / n_elements if n_elements else 0.0

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
        return value if isinstance(value, str) else None

    def token_text(self, token_id: object) -> str | None:
        if isinstance(token_id, int) and 0 <= token_id < len(self.tokens):
            return self.tokens[token_id]
        return None

    def f32_values(self, tensor: TensorInfo) -> np.ndarray:
        """The values of an F32 tensor, shaped in numpy's order (the row length last)."""
        if tensor.type != GGMLQuantizationType.F32:
            raise InputError(f"{self.path}: tensor '{tensor.name}' is {tensor.type_name}, not F32")
        values = np.fromfile(self.path, dtype="<f4", count=tensor.n_elements, offset=self.data_offset + tensor.offset)
        return values.reshape(tuple(reversed(tensor.shape)))


def read_gguf(path: str | Path) -> GgufFile:
    """Parse the header of `path`; raise InputError when it is not a complete GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    file_size = path.stat().st_size
    if file_size < 24:
        raise InputError(f"{path}: not a GGUF file ({file_size} bytes)")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        if view[:4] != GGUF_MAGIC:
            raise InputError(f"{path}: not a GGUF file (starts with {bytes(view[:4])!r}, expected b'GGUF')")
        try:
            return _parse(path, file_size, view)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{path}: truncated or corrupt GGUF header ({exc})") from exc


class _Cursor:
    def __init__(self, view: mmap.mmap | bytes, pos: int = 0):
        self.view = view
        self.pos = pos

    def unpack_many(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def unpack(self, fmt: str):
        return self.unpack_many(fmt)[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        end = self.pos + length
        if end > len(self.view):
            raise ValueError("string runs past the end of the file")
        text = self.view[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, value_type: int) -> Any:
        """The value at the cursor, an array decoded element by element."""
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack_many("<IQ")
            return [self.value(element_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {value_type}")
        return self.unpack(_SCALAR_FORMATS[value_type])

    def array(self) -> MetadataArray:
        """Step over the array at the cursor; where its elements lie."""
        element_type, count = self.unpack_many("<IQ")
        array = MetadataArray(element_type, count, self.pos)
        if element_type in _SCALAR_FORMATS:
            self.pos += count * struct.calcsize(_SCALAR_FORMATS[element_type])
        else:
            for _ in range(count):
                self.skip(element_type)
        if self.pos > len(self.view):
            raise ValueError("array runs past the end of the file")
        return array

    def skip(self, value_type: int) -> None:
        if value_type == _STRING:
            self.pos += 8 + struct.unpack_from("<Q", self.view, self.pos)[0]
        elif value_type == _ARRAY:
            self.array()
        elif value_type in _SCALAR_FORMATS:
            self.pos += struct.calcsize(_SCALAR_FORMATS[value_type])
        else:
            raise ValueError(f"unknown metadata value type {value_type}")


def _parse(path: Path, file_size: int, view: mmap.mmap) -> GgufFile:
    cursor = _Cursor(view, 4)
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise InputError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    tensor_count, kv_count = cursor.unpack_many("<QQ")

    metadata: dict[str, Any] = {}
    vocab_hash = hashlib.sha256()
    for _ in range(kv_count):
        key = cursor.string()
        value_type = cursor.unpack("<I")
        start = cursor.pos
        metadata[key] = cursor.array() if value_type == _ARRAY else cursor.value(value_type)
        if key == Keys.Tokenizer.LIST:
            vocab_hash.update(view[start:cursor.pos])

    tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack("<I")
        shape = cursor.unpack_many(f"<{n_dims}Q")
        type_id, offset = cursor.unpack_many("<IQ")
        try:
            quant_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise InputError(f"{path}: tensor {name} has unknown GGML type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[quant_type]
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        n_bytes = n_elements // block_size * type_size
        tensors.append(TensorInfo(name, shape, quant_type, n_elements, n_bytes, offset))

    alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1:
        raise ValueError(f"{Keys.General.ALIGNMENT} is {alignment!r}, not a positive integer")
    data_offset = -(-cursor.pos // alignment) * alignment
    data_end = max((data_offset + t.offset + t.n_bytes for t in tensors), default=data_offset)
    if data_end > file_size:
        raise InputError(
            f"{path}: truncated GGUF: its tensors need {data_end} bytes but the file has {file_size}"
        )
    header = bytes(view[:cursor.pos])
    return GgufFile(
        path=path,
        file_size=file_size,
        version=version,
        metadata=metadata,
        tensors=tensors,
        data_offset=data_offset,
        header=header,
        header_sha256=hashlib.sha256(header).hexdigest(),
        vocab_sha256=vocab_hash.hexdigest(),
    )
