#!/usr/bin/env bash
# Block-streaming calibration and GPTQ rounding on the device machine (one H100; no internet), quoted in
# docs/results.md ("Calibration on a GPU", "GPTQ on a GPU"). Prepare .device/ (git-ignored) with the gguf wheel, the
# dev model's config and tokenizer files in .device/smollm2-meta and debian-reference.en.txt.gz; then run with .device
# carried:
#   bash scripts/gpu/calibrate.sh same    tiny models calibrated on the CPU and on CUDA: the largest
#                                         differences of importance vectors, LIM and sensitivities
#   bash scripts/gpu/calibrate.sh 8b      a synthetic checkpoint of Llama-3-8B's dimensions, default settings
#   bash scripts/gpu/calibrate.sh gptq8b  the same checkpoint converted to uniform Q4_K with --rounding gptq (default
#                                         GPTQ tokens) from its calibration: wall time and its split
#   bash scripts/gpu/calibrate.sh big     a synthetic checkpoint of Llama-3-70B's block dimensions whose float32
#                                         copy is larger than the GPU's memory, small --tokens
# Prints wall time, phases and peak GPU memory (torch.cuda.max_memory_allocated) as a table, also written to
# $OUT/calibrate-STAGE.md when $OUT is set (the device tool brings it back; scripts/common/results_file.py puts it in
# docs/results.md). The 8B checkpoint and its calibration stay in $EWQ_DEVICE_CACHE (default
# ~/.cache/ewq-gguf-device), so that gptq8b on the same warm machine reuses them (and makes them when absent);
# everything else a stage writes goes to a `mktemp -d` folder, removed when it ends.
set -uo pipefail
export PYTHONUNBUFFERED=1
STAGE=${1:?stage: same, 8b, gptq8b or big}
KEEP=${EWQ_DEVICE_CACHE:-$HOME/.cache/ewq-gguf-device}/synthetic-8b
WORK=$(mktemp -d) || exit 1
trap 'rm -rf "$WORK"' EXIT
python3 -m pip install -q --no-index --no-deps --target "$WORK/site" .device/gguf-*.whl || exit 1
export PYTHONPATH=$WORK/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - "$STAGE" "$WORK" "$PWD/.device" "$KEEP" <<'PY' | tee "${OUT:-$WORK}/calibrate-$STAGE.md"
import gzip, json, sys, time
from pathlib import Path
import numpy as np
import torch
from ewq_gguf.calibrate import calibrate

stage, work, device_files, keep = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
keep.mkdir(parents=True, exist_ok=True)
text = keep / "text.txt"   # where a saved calibration finds its text again (GPTQ checks it)
text.write_text(gzip.decompress((device_files / "debian-reference.en.txt.gz").read_bytes()).decode()[:2_000_000])

def run(folder, **options):
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = calibrate(folder, text, device="cuda", progress=False, **options)
    return result, time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**30

if stage == "same":
    from testkit.tiny_models import TINY, make_tiny_model
    print("| architecture | compute | imatrix max rel diff | LIM max abs diff | alpha cuda/cpu min..max |")
    print("|---|---|---|---|---|")
    for architecture in sorted(TINY):
        for dtype in ("float32", "bfloat16"):
            folder = make_tiny_model(work / architecture, architecture,
                                     dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
            options = dict(tokens=1024, ctx=128, sensitivity_tokens=512, error_types=(), compute_dtype=dtype)
            cpu = calibrate(folder, text, device="cpu", progress=False, **options)
            cuda = run(folder, **options)[0]
            vectors_cpu, vectors_cuda = cpu.imatrix.vectors(), cuda.imatrix.vectors()
            rel = max(float(((vectors_cuda[k] - vectors_cpu[k]).abs() / vectors_cpu[k].abs().clamp_min(1e-12)).max())
                      for k in vectors_cpu)
            lim = max(abs(a - b) for a, b in zip(cpu.lim, cuda.lim))
            ratios = [cuda.sensitivity[k].alpha / cpu.sensitivity[k].alpha for k in cpu.sensitivity
                      if cpu.sensitivity[k].alpha > 0]
            print(f"| {architecture} | {dtype} | {rel:.2e} | {lim:.2e} | {min(ratios):.4f}..{max(ratios):.4f} |")
            import shutil; shutil.rmtree(work / architecture)
else:
    from scripts.bench.large import LLAMA3_70B, LLAMA3_8B, build_checkpoint

    def describe(folder, total):
        config = json.loads((folder / "config.json").read_text())
        print(f"checkpoint: {config['num_hidden_layers']} blocks of hidden {config['hidden_size']}, "
              f"{total / 1e9:.1f} GB bf16 ({2 * total / 2**30:.1f} GiB in float32); GPU "
              f"{torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB")

    def calibrated(folder, total, options, saved=None):
        describe(folder, total)
        result, wall, peak = run(folder, **options)
        if saved is not None:
            result.save(saved)
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.seconds.items())
        print("| checkpoint | tokens | sensitivity tokens | compute | wall s | peak GPU GiB | phases |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {stage} | {result.tokens} | {result.sensitivity_tokens} | {result.device} | {wall:.1f} | {peak:.2f} | "
              f"{phases} |")

    folder, calibration = keep / "checkpoint", keep / "calibration.json"
    if stage in ("8b", "gptq8b") and not (folder / "config.json").exists():
        build_checkpoint(folder, 15.5, device_files / "smollm2-meta", LLAMA3_8B)
    total = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"] \
        if stage != "big" else 0
    if stage == "8b" or (stage == "gptq8b" and not calibration.exists()):
        calibrated(folder, total, {}, calibration)
    if stage == "gptq8b":
        from ewq_gguf.api import convert
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        converted = convert(folder, work / "gptq.gguf", "uniform", type="Q4_K", calibration=str(calibration),
                            rounding="gptq", device="cuda", progress=False)
        wall = time.perf_counter() - started
        times = converted.stage_seconds
        split = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items())
        kept = sum(entry.rounding == "gptq" for entry in converted.plan.entries)
        print("| checkpoint | GPTQ tokens | type | wall s | peak GPU GiB | tensors rounded by GPTQ | split |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {stage} | {converted.plan.params['gptq_tokens']} | Q4_K | {wall:.1f} | "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} | {kept} | {split} |")
    if stage == "big":
        free, capacity = torch.cuda.mem_get_info()
        # float32 copy (2x the bf16 bytes) beyond the GPU's memory
        folder = work / "synthetic"
        total, _ = build_checkpoint(folder, capacity / 2 / 1e9 * 1.08, device_files / "smollm2-meta", LLAMA3_70B)
        calibrated(folder, total, dict(tokens=2048, sensitivity_tokens=1024))
PY
