"""Benchmark: convert a synthetic Llama checkpoint of 8+ GB and show memory stays bounded by a few tensors.

Builds a checkpoint with Llama-3-8B's layer shapes (hidden 4096, FFN 14336, 32 heads, 8 KV heads), as many blocks
as it takes to reach --size-gb of bf16 safetensors shards, random weights written tensor by tensor (never the whole
model in memory), and a real tokenizer (the development model's, or a tiny trained one). Then, each in its own
process with the shards evicted from the page cache first (so reads come from disk):
  read     every tensor loaded once through ewq_gguf's checkpoint reader (read throughput, peak RSS)
  convert  `ewq-gguf convert` with the given method/type (default uniform Q8_0; EWQ's k-quant tiers are far slower on
           a CPU) and --split-max-size, verified on the way out as every conversion is
and prints wall time, throughput and peak RSS against the bound 2 GB + 2 x the largest tensor. The checkpoint and
the output are deleted afterwards unless --keep.

    python -m scripts.bench.large [--folder DIR] [--size-gb 8] [--type Q8_0 | --method ewq] [--split-max-size 2G]
                                  [--tokenizer-from DIR] [--keep] [--results docs/results.md]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from ewq_gguf.devenv import REPOSITORY, dev_model
from scripts.bench.analyze import evict
from scripts.common.llama_tools import MeasuredRun, run_measured
from scripts.common.results_file import shown_arguments, update_section

# Llama-3-8B's block; the block count is chosen for the size asked for
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json")
SHARD_BYTES = 2 * 10**9
ROWS_PER_WRITE = 1 << 12        # rows generated and written at a time: bounds the builder's memory
GB = 10**9


# --- building the checkpoint -------------------------------------------------------------------------------------

def tokenizer_into(folder: Path, source: Path | None) -> dict:
    """Tokenizer files into `folder`; returns vocab_size, bos_token_id and eos_token_id for config.json."""
    if source is not None and (source / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, folder / name)
        config = json.loads((source / "config.json").read_text())
        return {key: config[key] for key in ("vocab_size", "bos_token_id", "eos_token_id")}
    from testkit.tiny_tokenizers import make_bpe_tokenizer

    tokenizer = make_bpe_tokenizer(folder, style="llama3")
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for block in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{block}."
        shapes += [(prefix + "input_layernorm.weight", (hidden,)),
                   (prefix + "self_attn.q_proj.weight", (hidden, hidden)),
                   (prefix + "self_attn.k_proj.weight", (kv, hidden)),
                   (prefix + "self_attn.v_proj.weight", (kv, hidden)),
                   (prefix + "self_attn.o_proj.weight", (hidden, hidden)),
                   (prefix + "post_attention_layernorm.weight", (hidden,)),
                   (prefix + "mlp.gate_proj.weight", (ffn, hidden)),
                   (prefix + "mlp.up_proj.weight", (ffn, hidden)),
                   (prefix + "mlp.down_proj.weight", (hidden, ffn))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def bf16_bytes(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * 2 for _, shape in shapes)


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """A bf16 safetensors file written header first, then each tensor a few thousand rows at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name, shape in tensors:
            if len(shape) == 1:     # norms: near one, as trained ones are
                values = 1 + 0.1 * torch.randn(shape, generator=generator)
                handle.write(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                continue
            for start in range(0, shape[0], ROWS_PER_WRITE):
                rows = min(ROWS_PER_WRITE, shape[0] - start)
                values = torch.randn((rows, shape[1]), generator=generator).mul_(0.02)
                handle.write(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


def build_checkpoint(folder: Path, size_gb: float, tokenizer_source: Path | None,
                     dims: dict = LLAMA3_8B) -> tuple[int, int]:
    """Write the checkpoint (blocks of `dims`); returns (bytes of weights, bytes of the largest tensor)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", **dims, **tokenizer_into(folder,
                                                                                                  tokenizer_source)}
    fixed = bf16_bytes(tensor_shapes({**config, "num_hidden_layers": 0}))
    per_block = bf16_bytes(tensor_shapes({**config, "num_hidden_layers": 1})) - fixed
    config["num_hidden_layers"] = max(1, math.ceil((size_gb * GB - fixed) / per_block))
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    shapes = tensor_shapes(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        if shards[-1] and shard_bytes + nbytes > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += nbytes
    weight_map = {}
    for number, tensors in enumerate(shards):
        file = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / file, tensors, seed=number)
        weight_map.update(dict.fromkeys((name for name, _ in tensors), file))
        print(f"  wrote {file} ({len(tensors)} tensors)", flush=True)
    total = bf16_bytes(shapes)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total, max(math.prod(shape) * 2 for _, shape in shapes)


# --- measuring ---------------------------------------------------------------------------------------------------

READ_PASS = """
import sys, time
from ewq_gguf.source.checkpoint import Checkpoint
checkpoint = Checkpoint(sys.argv[1])
started, total = time.perf_counter(), 0
for record in checkpoint:
    checkpoint.load(record.name)
    total += record.nbytes
print(f"read {total} bytes in {time.perf_counter() - started:.3f} s")
"""


def read_pass(folder: Path) -> tuple[MeasuredRun, float]:
    """(the run, seconds spent reading as the child timed it, without its start-up)."""
    evict(str(folder))
    run = run_measured([sys.executable, "-c", READ_PASS, folder])
    seconds = float(run.output.strip().splitlines()[-1].split(" in ")[1].split()[0])
    return run, seconds


def convert_run(folder: Path, out: Path, options: list[str]) -> MeasuredRun:
    evict(str(folder))
    return run_measured([sys.executable, "-m", "ewq_gguf", "convert", folder, out, "--quiet", *options])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where the checkpoint and output go [default: a new temporary "
                                                    "folder]")
    parser.add_argument("--size-gb", type=float, default=8.0, help="checkpoint size to reach (decimal GB)")
    parser.add_argument("--method", help="convert --method [default: uniform with --type]")
    parser.add_argument("--type", default=None, help="convert --type [default: Q8_0 unless --method is given]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--split-max-size", default="2G", help="convert --split-max-size ('' for one file)")
    parser.add_argument("--tokenizer-from", type=Path, default=dev_model("smollm2"),
                        help="a model folder whose tokenizer is copied [default: the development model; a tiny "
                             "trained tokenizer when it is missing]")
    parser.add_argument("--calibrate-tokens", type=int, default=0,
                        help="instead of converting, run `ewq-gguf calibrate` over this many tokens (and as many "
                             "sensitivity tokens) and check its peak RSS against 2 GB + 3 x the largest block in "
                             "float32 + one chunk of hidden states")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    parser.add_argument("--results", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()

    options = ["--device", args.device]
    if args.method:
        options += ["--method", args.method]
    if args.type or not args.method:
        options += ["--type", args.type or "Q8_0"]
    if args.split_max_size:
        options += ["--split-max-size", args.split_max_size]
    work = args.folder or Path(tempfile.mkdtemp(prefix="ewq-bench-large-"))
    model, out = work / "synthetic-llama", work / "synthetic-llama.gguf"
    try:
        print(f"building a {args.size_gb:g} GB checkpoint in {model}", flush=True)
        started = time.perf_counter()
        weight_bytes, largest = build_checkpoint(model, args.size_gb, args.tokenizer_from)
        build_s = time.perf_counter() - started
        config = json.loads((model / "config.json").read_text())
        n_params = weight_bytes // 2

        if args.calibrate_tokens:
            calibrate_run(model, config, weight_bytes, build_s, args)
            return
        read, read_s = read_pass(model)
        converted = convert_run(model, out, options)
        parts = sorted(work.glob("synthetic-llama*.gguf"))
        out_bytes = sum(part.stat().st_size for part in parts)
        bound_mib = (2 * GB + 2 * largest) / 2**20

        rows = [
            ("checkpoint", f"{config['num_hidden_layers']} Llama-3-8B blocks, vocab {config['vocab_size']}, "
                           f"{n_params / 1e9:.2f} B parameters, {weight_bytes / GB:.2f} GB bf16 in "
                           f"{len(list(model.glob('*.safetensors')))} shards (built in {build_s:.0f} s)"),
            ("largest tensor", f"{largest / 2**20:.0f} MiB; RSS bound 2 GB + 2 x largest = {bound_mib:.0f} MiB"),
            ("read pass (cold cache)", f"{read_s:.1f} s reading, {weight_bytes / read_s / GB:.2f} GB/s; "
                                       f"process {read.wall_s:.1f} s, peak RSS {read.peak_rss_mib:.0f} MiB"),
            (f"convert {' '.join(options)}", f"{converted.wall_s:.1f} s wall, "
                                             f"{weight_bytes / converted.wall_s / GB:.3f} GB/s of checkpoint, "
                                             f"{n_params / converted.wall_s / 1e6:.1f} M parameters/s; "
                                             f"peak RSS {converted.peak_rss_mib:.0f} MiB"),
            ("convert / read pass", f"{converted.wall_s / read.wall_s:.2f}x (process wall times)"),
            ("output", f"{len(parts)} file(s), {out_bytes / GB:.2f} GB"),
            ("peak RSS within bound", "yes" if max(read.peak_rss_mib, converted.peak_rss_mib) < bound_mib else "NO"),
        ]
        table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
        print(table)
        if args.results:
            plan = f"--method {args.method}" if args.method else f"uniform {args.type or 'Q8_0'}"
            where = "CUDA" if torch.cuda.is_available() and args.device != "cpu" else "CPU"
            update_section(args.results, f"Large checkpoint, {plan}, {where}", table + f"\n\nMachine: {_machine()}.",
                           command=recorded_command(args.folder))
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
            for part in work.glob("synthetic-llama*.gguf"):
                part.unlink()
            if args.folder is None:
                shutil.rmtree(work, ignore_errors=True)


def calibrate_run(model: Path, config: dict, weight_bytes: int, build_s: float, args) -> None:
    """`ewq-gguf calibrate` of the checkpoint in its own process: wall time, phases, peak RSS against its bound."""
    calibration = model.parent / "calibration.json"
    ctx = 512
    run = run_measured([sys.executable, "-m", "ewq_gguf", "calibrate", model, "--tokens", args.calibrate_tokens,
                        "--sensitivity-tokens", args.calibrate_tokens, "--ctx", ctx, "--device", args.device,
                        "--out", calibration, "--quiet"])
    saved = json.loads(calibration.read_text())
    block_params = sum(math.prod(shape) for name, shape in tensor_shapes({**config, "num_hidden_layers": 1})
                       if name.startswith("model.layers.0."))
    hidden_chunk = ctx * config["hidden_size"] * 4
    bound_mib = (2 * GB + 3 * 4 * block_params + hidden_chunk) / 2**20
    rows = [
        ("checkpoint", f"{config['num_hidden_layers']} Llama-3-8B blocks, vocab {config['vocab_size']}, "
                       f"{weight_bytes / 2 / 1e9:.2f} B parameters, {weight_bytes / GB:.2f} GB bf16 "
                       f"(built in {build_s:.0f} s)"),
        ("bound", f"2 GB + 3 x one block in float32 ({4 * block_params / 2**20:.0f} MiB) + one chunk of hidden "
                  f"states ({hidden_chunk / 2**20:.0f} MiB) = {bound_mib:.0f} MiB"),
        (f"calibrate --tokens {args.calibrate_tokens} --device {args.device}",
         f"{run.wall_s:.1f} s wall ({', '.join(f'{k} {v:.1f} s' for k, v in saved['seconds'].items())}); "
         f"compute {saved['device']}; peak RSS {run.peak_rss_mib:.0f} MiB"),
        ("peak RSS within bound", "yes" if run.peak_rss_mib < bound_mib else "NO"),
    ]
    table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    if args.results:
        where = "CUDA" if torch.cuda.is_available() and args.device != "cpu" else "CPU"
        update_section(args.results, f"Large checkpoint, calibrate, {where}", table + f"\n\nMachine: {_machine()}.",
                       command=recorded_command(args.folder))


def recorded_command(folder: Path | None) -> str:
    """This run's command line for results.md. A --folder outside the repository (scratch space, such as a temporary
    folder) is left out: it is no part of the result, and would name a folder of this machine."""
    arguments = sys.argv[1:]
    if folder is not None and not Path(os.path.abspath(folder)).is_relative_to(REPOSITORY):
        kept, skip = [], False
        for argument in arguments:
            if not skip and argument != "--folder" and not argument.startswith("--folder="):
                kept.append(argument)
            skip = argument == "--folder"
        arguments = kept
    return "python -m scripts.bench.large " + shown_arguments(arguments)


def _machine() -> str:
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    cpus = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {cpus} CPU cores, {memory_gb:.0f} GB RAM, {gpu}"


if __name__ == "__main__":
    main()
