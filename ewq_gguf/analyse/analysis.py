"""ANALYSE: stream every block's 2-D weights through the entropy and ZD computations; the Analysis they produce.

The next block's tensors are read (and copied to the device) on a background thread while this block is measured,
so on a GPU the analysis costs little more than reading the checkpoint; at most two blocks are held on the device,
in their stored dtype (ZD needs a block's pooled mean and std before it can count). Tensors outside the blocks
(token embedding, output head) are not ranked, so they are not read.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..device import one_torch_thread, resolve_device
from ..errors import InputError
from ..progress import progress_bar
from ..source.model import SourceModel, TensorSpec, open_checkpoint
from .entropy import HISTOGRAM_BINS, MatrixEntropy, block_statistics
from .zd import zd_threshold

ANALYSIS_FORMAT = 1
READ_THREADS = 4  # a block's tensors are read (file -> memory -> device) in parallel: one reader leaves the GPU idle
# Block statistics an Analysis holds; the first two are the entropy readings EWQ can rank by.
ENTROPY_STATISTICS = ("softmax", "histogram")
STATISTICS = ENTROPY_STATISTICS + ("softmax_normalized", "zd")


@dataclass
class BlockAnalysis:
    """One block: its 2-D weights' parameter count, parameter-weighted mean entropies, ZD, and per-matrix values."""

    index: int
    params: int
    softmax: float
    softmax_normalized: float
    histogram: float
    zd: float
    matrices: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_matrices(cls, index: int, matrices: Sequence[MatrixEntropy]) -> "BlockAnalysis":
        params = sum(matrix.numel for matrix in matrices)

        def weighted(values: Sequence[float]) -> float:
            return sum(value * matrix.numel for value, matrix in zip(values, matrices)) / params

        return cls(index, params,
                   softmax=weighted([matrix.softmax for matrix in matrices]),
                   softmax_normalized=weighted([matrix.softmax_normalized for matrix in matrices]),
                   histogram=weighted([matrix.histogram for matrix in matrices]),
                   zd=sum(matrix.above_threshold for matrix in matrices) / params,
                   matrices=[{"name": matrix.name, "numel": matrix.numel, "softmax": matrix.softmax,
                              "softmax_normalized": matrix.softmax_normalized, "histogram": matrix.histogram}
                             for matrix in matrices])


@dataclass
class Analysis:
    """Per-block entropies and ZD of one model: what EWQ and ZD plan from, and what FastEWQ trains on."""

    model: str
    architecture: str
    n_blocks: int
    blocks: list[BlockAnalysis]
    device: str = "cpu"
    seconds: float = 0.0
    histogram_bins: int = HISTOGRAM_BINS

    def scores(self, statistic: str) -> np.ndarray:
        """One value per block, in block order: softmax, histogram, softmax_normalized or zd."""
        if statistic not in STATISTICS:
            raise InputError(f"unknown statistic '{statistic}' (choose from {', '.join(STATISTICS)})")
        return np.array([getattr(block, statistic) for block in self.blocks], dtype=np.float64)

    @property
    def block_params(self) -> list[int]:
        return [block.params for block in self.blocks]

    def check_matches(self, model: SourceModel) -> None:
        """InputError unless this analysis describes `model`'s blocks (same count, same parameter counts)."""
        expected = block_matrix_params(model)
        if self.block_params != expected:
            raise InputError(f"the analysis of '{self.model}' ({self.n_blocks} blocks) does not match this model "
                             f"({len(expected)} blocks); analyse this model instead")

    # --- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = ANALYSIS_FORMAT
        return data

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Analysis":
        try:
            if data.get("format") != ANALYSIS_FORMAT:
                raise ValueError(f"analysis format {data.get('format')!r}, expected {ANALYSIS_FORMAT}")
            fields = {key: value for key, value in data.items() if key != "format"}
            fields["blocks"] = [BlockAnalysis(**block) for block in data["blocks"]]
            analysis = cls(**fields)
            if [block.index for block in analysis.blocks] != list(range(analysis.n_blocks)):
                raise ValueError("blocks are not numbered 0..n_blocks-1")
            return analysis
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a valid ewq-gguf analysis ({exc})") from exc

    @classmethod
    def from_json(cls, text: str) -> "Analysis":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise InputError(f"analysis is not valid JSON ({exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> "Analysis":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"analysis file not found: {path}")
        return cls.from_json(path.read_text())


def block_matrices(model: SourceModel) -> dict[int, list[TensorSpec]]:
    """Block index -> its 2-D weight specs, from names and shapes only."""
    blocks: dict[int, list[TensorSpec]] = {}
    for spec in model.specs:
        if spec.block is not None and spec.is_matrix:
            if spec.numel == 0:
                raise InputError(f"tensor '{spec.name}' is empty")
            blocks.setdefault(spec.block, []).append(spec)
    if not blocks:
        raise InputError(f"model '{model.name}' has no transformer blocks with 2-D weights to analyse")
    if sorted(blocks) != list(range(len(blocks))):
        raise InputError(f"model '{model.name}': block numbers are not contiguous from 0")
    return dict(sorted(blocks.items()))


def block_matrix_params(model: SourceModel) -> list[int]:
    """Parameter count of each block's 2-D weights (headers only): FastEWQ's size feature, ZD's denominator."""
    return [sum(spec.numel for spec in specs) for specs in block_matrices(model).values()]


def analyze(model: SourceModel | str | Path, *, device: str | torch.device = "auto",
            progress: bool = True) -> Analysis:
    """Entropies (softmax, histogram) and ZD of every block of `model` (a SourceModel or checkpoint folder)."""
    if not isinstance(model, SourceModel):
        model = open_checkpoint(model)
    target = device if isinstance(device, torch.device) else resolve_device(device)
    blocks = block_matrices(model)
    started = time.perf_counter()
    results = []
    bar = progress_bar(total=sum(spec.numel for specs in blocks.values() for spec in specs), desc="analysing", unit="w", unit_scale=True,
                       enabled=progress)
    # on a CPU the analysis is memory-bound elementwise work, which several torch threads only slow down
    with bar, one_torch_thread(target), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ewq-analyse-next") as pool, \
            ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="ewq-analyse-read") as readers:
        loaded = _read_ahead(pool, readers, model, list(blocks.values()), target)
        for (index, block_specs), tensors in zip(blocks.items(), loaded):
            names = [spec.name for spec in block_specs]
            matrices = block_statistics(tensors, names, zd_threshold)
            results.append(BlockAnalysis.from_matrices(index, matrices))
            bar.update(sum(matrix.numel for matrix in matrices))
    return Analysis(model.name, model.adapter.arch_name, len(blocks), results, device=str(target),
                    seconds=round(time.perf_counter() - started, 3))


def _read_ahead(pool: ThreadPoolExecutor, readers: ThreadPoolExecutor, model: SourceModel,
                blocks: Sequence[Sequence[TensorSpec]], device: torch.device) -> Iterator[list[torch.Tensor]]:
    """Each block's tensors on `device`, in order; the next block is read (and copied) while this one is measured.
    A block at a time, not a tensor: fewer hand-overs between the threads. File reads and host-to-device copies
    release the GIL, so the readers overlap each other too."""
    def read(specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
        return list(readers.map(lambda spec: model.load(spec).to(device), specs))

    pending: Optional[Future] = pool.submit(read, blocks[0]) if blocks else None
    for position in range(len(blocks)):
        tensors = pending.result()
        pending = pool.submit(read, blocks[position + 1]) if position + 1 < len(blocks) else None
        yield tensors
