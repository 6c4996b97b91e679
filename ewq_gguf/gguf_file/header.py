"""What precedes the tensor data in the GGUF files we write, laid out once for writing and for size prediction.

A file is its header (the model's metadata, our ewq.* keys, the tensor table), padded to the data alignment, then
each tensor's data padded to it. write_gguf writes the header add_header describes; planned_file_size measures the
same header, so a dry run prints, and the optimal planner budgets, the exact size of the file written later.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from .. import __version__
from ..constants import KEY_EWQ_METHOD, KEY_EWQ_PARAMS, KEY_EWQ_PLAN, KEY_EWQ_VERSION
from ..plan import Plan

if TYPE_CHECKING:
    from ..source.model import SourceModel

FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16, QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, QType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
    QType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S, QType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    QType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, QType.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
    QType.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS, QType.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}


def file_type_of(plan: Plan) -> gguf.LlamaFileType:
    """general.file_type: the type holding most of the 2-D weights' parameters (llama.cpp's label for a mix)."""
    weights: dict[QType, int] = {}
    for entry in plan.entries:
        if len(entry.shape) >= 2:
            weights[entry.requested] = weights.get(entry.requested, 0) + entry.numel
    if not weights:
        return gguf.LlamaFileType.ALL_F32
    return FILE_TYPES[max(weights, key=weights.get)]


def add_plan_metadata(writer: gguf.GGUFWriter, plan: Plan) -> None:
    """ewq.* keys: enough to print the plan back (inspect) and to reuse it (convert --plan FILE.gguf)."""
    writer.add_string(KEY_EWQ_VERSION, __version__)
    writer.add_string(KEY_EWQ_METHOD, plan.method)
    writer.add_string(KEY_EWQ_PARAMS, json.dumps(plan.params))
    writer.add_string(KEY_EWQ_PLAN, plan.to_json(indent=None))
    writer.add_file_type(file_type_of(plan))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_header(writer: gguf.GGUFWriter, model: SourceModel, plan: Plan) -> None:
    """Give `writer` everything before the tensor data: the model's metadata, the ewq.* keys and the tensor table in
    plan order (gguf-py gives each tensor its offset, padded to the data alignment)."""
    model.add_metadata(writer)
    add_plan_metadata(writer, plan)
    for entry in plan.entries:
        writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), entry.nbytes, raw_dtype=entry.type)


def padded(nbytes: int, alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT) -> int:
    """The room nbytes of header or tensor data take in the file: rounded up to the data alignment."""
    return gguf.GGUFWriter.ggml_pad(nbytes, alignment)


def file_size(header_bytes: int, tensor_nbytes: Iterable[int], alignment: int) -> int:
    """The size of a GGUF file whose header takes header_bytes: the header padded to the alignment, then each
    tensor's data padded to it."""
    return padded(header_bytes, alignment) + sum(padded(nbytes, alignment) for nbytes in tensor_nbytes)


def planned_file_size(model: SourceModel, plan: Plan) -> int:
    """The exact size of the GGUF file write_gguf writes for `plan` (unsplit): the header add_header describes is
    written to a scratch file by gguf-py, as write_gguf writes it, and measured."""
    with tempfile.TemporaryDirectory(prefix="ewq-gguf-size-") as scratch:
        path = Path(scratch) / "header.gguf"
        writer = gguf.GGUFWriter(path, model.adapter.arch_name)
        add_header(writer, model, plan)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return file_size(path.stat().st_size, (entry.nbytes for entry in plan.entries), writer.data_alignment)
