"""Error-compensating (GPTQ) rounding inside the GGUF block formats: W, H, type -> ggml bytes.

Pure like the rest of quant: a weight matrix W (rows = outputs, columns = inputs), the second-moment matrix
H = X^T X of its inputs and the type in, the type's bytes out, which ggml's own dequantization decodes unchanged.
The bytes minimise (approximately) the output error tr((W - Q) H (W - Q)^T) instead of the weight error:

- The columns are taken in order, one ggml block group at a time (256 columns for the k-quants and IQ4_XS, 32 for
  the legacy types, IQ4_NL and MXFP4). At the first column of a group, the group's scales and minimums are chosen for
  every row by the type's own encoder (our ggml scale search, weighted by the importance vector: the imatrix when
  one is given, else diag(H)) applied to the *current* weights, that already carry the error of the columns before.
- Then each column is rounded to the nearest code of the fixed grid (clamped to the type's code range) and its
  error is spread over the columns not yet rounded with the upper Cholesky factor of H^-1 (GPTQ, Frantar et al.
  2022, with lazy batch updates).
- The codes are written into the bytes the encoder produced for the group, in place of its own codes.

Where each type keeps its codes is not written down per type: `code_layout` finds it once from our decoder, which
the tests prove equal to ggml's. Flipping one bit of an encoded block changes exactly one decoded value when the bit
belongs to that value's code (a scale or minimum bit changes a whole sub-block); the size of the change orders
the bits of a code (linear grids) and a two's-complement top bit shows as a change of the other sign (Q8_0). The
non-linear grids (IQ4_NL, IQ4_XS, MXFP4) are decoded for all 16 codes instead.

`gptq_quantize` also encodes W the usual way (nearest rounding with the same importance) and keeps whichever has the
lower objective, so the result is never worse than nearest rounding on what it minimises.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from gguf import GGMLQuantizationType as QType

from . import CODECS, block_shape, dequantize, floats, quantize

# grids looked up in a table of 16 values rather than a scale times an integer
TABLE_TYPES = frozenset({QType.IQ4_NL, QType.IQ4_XS, QType.MXFP4})
# the types GPTQ rounds; the float types have no rounding to compensate
GPTQ_TYPES = frozenset(qtype for qtype in CODECS if qtype not in floats.CODECS)
DEFAULT_DAMP = 0.01   # fraction of the mean diagonal of H added to the diagonal
LAZY_BATCH = 128      # columns updated together (at least one block group)


@dataclass(frozen=True)
class CodeLayout:
    """Where the codes of one ggml block lie, and how a code maps to a value given the block's scales.

    byte, bit: (elements, bits) long, the byte of the block and the bit in it of each code bit, least significant
    first. signed: codes are two's complement (value = a * code + b for code in [-(2^(bits-1) - 1), 2^(bits-1) - 1]);
    otherwise value = a * code + b for code in [0, 2^bits - 1] (linear) or a table of 2^bits values (table).
    """

    qtype: QType
    elements: int
    nbytes: int
    bits: int
    byte: torch.Tensor
    bit: torch.Tensor
    code_mask: torch.Tensor     # (nbytes,) uint8, the bits that hold codes
    signed: bool
    table: bool

    @property
    def code_range(self) -> tuple[int, int]:
        if self.signed:
            top = (1 << (self.bits - 1)) - 1
            return -top, top     # ggml's encoders stay within +-127 (Q8_0), and so do its SIMD dot products
        return 0, (1 << self.bits) - 1


def _decode_blocks(blocks: torch.Tensor, qtype: QType, elements: int) -> torch.Tensor:
    return dequantize(blocks, qtype, elements)


@lru_cache(maxsize=None)
def code_layout(qtype: QType) -> CodeLayout:
    """The code bits of qtype's block, found by flipping every bit of encoded random blocks (see the module notes)."""
    if qtype not in GPTQ_TYPES:
        raise ValueError(f"GPTQ rounding does not apply to {qtype.name}")
    elements, nbytes = block_shape(qtype)
    generator = torch.Generator().manual_seed(1234)
    for attempt in range(8):
        rows = torch.randn(1, elements, generator=generator) * (1 + attempt)
        block = quantize(rows, qtype, None, backend="torch")[0]
        layout = _probe(block, qtype, elements, nbytes)
        if layout is not None:
            return layout
    raise RuntimeError(f"could not locate the codes of {qtype.name}")


def _probe(block: torch.Tensor, qtype: QType, elements: int, nbytes: int) -> Optional[CodeLayout]:
    base = _decode_blocks(block[None], qtype, elements)[0]
    n_bits = nbytes * 8
    flips = block.repeat(n_bits, 1)
    index = torch.arange(n_bits)
    flips[index, index // 8] ^= (1 << (index % 8)).to(torch.uint8)
    decoded = _decode_blocks(flips, qtype, elements)
    changed = (decoded != base) & ~(torch.isnan(decoded) & torch.isnan(base))
    code_bits = (changed.sum(dim=1) == 1).nonzero().squeeze(1)
    if code_bits.numel() == 0 or code_bits.numel() % elements:
        return None
    bits = code_bits.numel() // elements
    element = changed[code_bits].to(torch.int64).argmax(dim=1)
    if not bool((torch.bincount(element, minlength=elements) == bits).all()):
        return None
    # the change of setting the bit (flipping a set bit clears it: the change of the other sign)
    was_set = (block[code_bits // 8].to(torch.int64) >> (code_bits % 8)) & 1
    delta = (decoded[code_bits, element] - base[element]) * (1 - 2 * was_set).to(torch.float32)
    table = qtype in TABLE_TYPES
    byte = torch.empty(elements, bits, dtype=torch.int64)
    bit = torch.empty(elements, bits, dtype=torch.int64)
    signed = False
    for e in range(elements):
        mine = (element == e).nonzero().squeeze(1)
        positions = code_bits[mine]
        if table:  # a nibble: significance follows the bit position
            order = torch.argsort(positions)
        else:
            order = torch.argsort(delta[mine].abs())
            ordered = delta[mine][order]
            if bool((ordered == 0).any()):
                return None
            # linear: each bit's change is twice the one below; two's complement: the top bit's has the other sign
            top_flips = bool((ordered[-1] * ordered[0]) < 0)
            if e == 0:
                signed = top_flips
            elif top_flips != signed:
                return None
        byte[e] = positions[order] // 8
        bit[e] = positions[order] % 8
    mask = torch.zeros(nbytes, dtype=torch.int64)
    mask.index_add_(0, byte.reshape(-1), 1 << bit.reshape(-1))
    return CodeLayout(qtype, elements, nbytes, bits, byte, bit, mask.to(torch.uint8), signed, table)


def pack_codes(blocks: torch.Tensor, codes: torch.Tensor, layout: CodeLayout) -> torch.Tensor:
    """blocks (n, nbytes) uint8 with their codes replaced by codes (n, elements) (signed values for signed layouts)."""
    device = blocks.device
    raw = codes.to(torch.int64) & ((1 << layout.bits) - 1)
    byte, bit = layout.byte.to(device), layout.bit.to(device)
    shifts = torch.arange(layout.bits, device=device)
    contributions = ((raw.unsqueeze(-1) >> shifts) & 1) << bit          # (n, elements, bits)
    packed = torch.zeros(blocks.shape, dtype=torch.int64, device=device)
    packed.index_add_(1, byte.reshape(-1), contributions.reshape(blocks.shape[0], -1))
    kept = blocks.to(torch.int64) & (~layout.code_mask.to(device, torch.int64) & 0xFF)
    return (kept | packed).to(torch.uint8)


class _Grid:
    """The values the codes of one block group can take, per row: a*code + b or a table of values."""

    def __init__(self, blocks: torch.Tensor, layout: CodeLayout):
        self.layout = layout
        self.blocks = blocks
        n, elements = blocks.shape[0], layout.elements

        def decoded_with(code: int) -> torch.Tensor:
            codes = torch.full((n, elements), code, dtype=torch.int64, device=blocks.device)
            return _decode_blocks(pack_codes(blocks, codes, layout), layout.qtype, elements)

        if layout.table:
            self.values = torch.stack([decoded_with(code) for code in range(1 << layout.bits)])  # (16, n, elements)
        else:
            self.offset = decoded_with(0)
            self.step = decoded_with(1) - self.offset

    def round(self, w: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code of the grid for the values w (n,) of the group's column; (codes, their values)."""
        if self.layout.table:
            values = self.values[:, :, column]
            codes = (values - w.unsqueeze(0)).abs().argmin(dim=0)
            return codes, values.gather(0, codes.unsqueeze(0)).squeeze(0)
        low, high = self.layout.code_range
        step, offset = self.step[:, column], self.offset[:, column]
        safe = torch.where(step != 0, step, torch.ones_like(step))
        codes = torch.round((w - offset) / safe).clamp_(low, high)
        codes = torch.where(step != 0, codes, torch.zeros_like(codes))
        return codes.to(torch.int64), step * codes + offset


@dataclass(frozen=True)
class GptqResult:
    """The bytes (n_rows, row_nbytes) uint8, which rounding made them, and both objectives tr((W-Q) H (W-Q)^T)."""

    data: torch.Tensor
    rounding: str            # "gptq", or "nearest" where GPTQ did not lower the objective
    objective_gptq: float
    objective_nearest: float


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) = ||(W - Q) X^T||^2 for H = X^T X, in float64."""
    diff = (weight.to(torch.float64) - dequantized.to(torch.float64))
    return float(((diff @ hessian.to(diff.device, torch.float64)) * diff).sum())


def upper_inverse_cholesky(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (float64), columns of H that are all zero
    (inputs never seen) given a unit diagonal first, as GPTQ does."""
    h = hessian.to(torch.float64).clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    mean = float(diagonal.mean())
    for attempt in range(6):  # more damping if float64 still finds H singular
        damped = h + (damp * 10 ** attempt) * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the input second-moment matrix is not positive definite even after damping")


def gptq_rows(weight: torch.Tensor, hessian: torch.Tensor, qtype: QType, importance: Optional[torch.Tensor] = None,
              damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """GPTQ bytes of weight (n_rows, n_per_row) in qtype: uint8 (n_rows, row_nbytes) on weight's device.

    hessian: (n_per_row, n_per_row), the inputs' X^T X (any positive scale). importance: the scale search's weights
    per column (None: diag(hessian)).
    """
    layout = code_layout(qtype)
    group = layout.elements
    n_rows, columns = weight.shape
    if columns % group:
        raise ValueError(f"{qtype.name} cannot hold rows of {columns} elements (block size {group})")
    device = weight.device
    hessian = hessian.to(device)
    if importance is None:
        importance = hessian.diagonal()
    importance = importance.to(device, torch.float32)
    upper = upper_inverse_cholesky(hessian, damp).to(torch.float32)
    w = weight.to(torch.float32).clone()
    batch = max(group, LAZY_BATCH // group * group)
    groups: list[torch.Tensor] = []
    for start in range(0, columns, batch):
        end = min(start + batch, columns)
        current = w[:, start:end].clone()
        errors = torch.zeros_like(current)
        codes = torch.empty(current.shape, dtype=torch.int64, device=device)
        grid = None
        for j in range(end - start):
            offset = j % group
            if offset == 0:
                part = current[:, j:j + group].contiguous()
                blocks = quantize(part, qtype, importance[start + j:start + j + group])
                groups.append(blocks)
                grid = _Grid(blocks, layout)
            column = current[:, j]
            code, value = grid.round(column, offset)
            codes[:, j] = code
            error = (column - value) / upper[start + j, start + j]
            current[:, j:] -= error.unsqueeze(1) * upper[start + j, start + j:end].unsqueeze(0)
            errors[:, j] = error
        for g in range((end - start) // group):
            index = start // group + g
            groups[index] = pack_codes(groups[index], codes[:, g * group:(g + 1) * group], layout)
        if end < columns:
            # in float64, rounded once to float32: products of float32 values are exact there, so CPU and CUDA
            # (whose matrix products sum in different orders) give the same float32 update except where a sum lies
            # within its float64 rounding error of a float32 rounding boundary
            w[:, end:] -= (errors.double() @ upper[start:end, end:].double()).float()
    return torch.stack(groups, dim=1).reshape(n_rows, -1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, qtype: QType,
                  importance: Optional[torch.Tensor] = None, damp: float = DEFAULT_DAMP) -> GptqResult:
    """GPTQ bytes of weight in qtype, or nearest rounding (quantize with the same importance) where that has the
    lower output error tr((W-Q) H (W-Q)^T) (H undamped)."""
    weight = weight.to(torch.float32)
    search_importance = importance if importance is not None else hessian.diagonal().to(torch.float32)
    nearest = quantize(weight, qtype, search_importance.to(weight.device))
    objective_nearest = output_error(weight, dequantize(nearest, qtype, weight.shape[1]), hessian)
    rounded = gptq_rows(weight, hessian, qtype, search_importance, damp)
    objective_gptq = output_error(weight, dequantize(rounded, qtype, weight.shape[1]), hessian)
    if objective_gptq < objective_nearest:
        return GptqResult(rounded, "gptq", objective_gptq, objective_nearest)
    return GptqResult(nearest, "nearest", objective_gptq, objective_nearest)
