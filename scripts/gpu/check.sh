#!/usr/bin/env bash
# Batched GPU checks for the device machine (H100/H200, no internet), quoted in docs/results.md ("GPU runs").
# Prepare .device/ (git-ignored) with: the gguf wheel, the slimmed llama-cpp-python 0.3.36 sdist (without
# vendor/llama.cpp/{models,docs,benches}), the dev model's config/tokenizer files in .device/smollm2-meta and the
# evaluation text; then run with .device carried, one stage per call (each fits the 10-minute limit):
#   bash scripts/gpu/check.sh ppl     CUDA build of llama-cpp-python (background) while a smollm2-shaped model is
#                                     trained for a minute on half of the text; analysis vs read; PPL GPU vs CPU
#   bash scripts/gpu/check.sh large   8 GB synthetic Llama converted with EWQ on CUDA and on the CPU; analysis vs
#                                     read on it
# Installs (the wheels, the CUDA build of llama-cpp-python) go to $EWQ_DEVICE_CACHE, default
# ~/.cache/ewq-gguf-device: a fixed per-user folder, so they are kept between calls while the machine stays warm (files
# under the repository are not). Everything else a stage writes (models, GGUF files, analyses) goes to a fresh
# `mktemp -d` folder, removed when the stage ends.
set -uo pipefail
export PYTHONUNBUFFERED=1
STAGE=${1:?stage: ppl or large}
SITE=${EWQ_DEVICE_CACHE:-$HOME/.cache/ewq-gguf-device}
WORK=$(mktemp -d) || exit 1
trap 'rm -rf "$WORK"' EXIT
TEXT=$PWD/.device/debian-reference.en.txt.gz
mkdir -p "$SITE"
[ -d "$SITE/py/gguf" ] || python3 -m pip install -q --no-index --no-deps --target "$SITE/py" .device/gguf-*.whl \
  .device/diskcache-*.whl || exit 1
export PYTHONPATH=$SITE/py:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

case $STAGE in
ppl)
  # the build leaves its libraries in the source tree (llama_cpp/lib), which is then used in place; it runs in a
  # fresh folder of the cache, and the tree is moved to $LLAMA only once the build succeeded (an interrupted build
  # is never taken for a finished one)
  LLAMA=$SITE/llama_cpp_python-0.3.36
  if [ ! -d "$LLAMA/llama_cpp/lib" ]; then
    ( build=$(mktemp -d "$SITE/llbuild.XXXXXX") && cd "$build" && \
      tar xzf "$OLDPWD/.device/llama_cpp_python-0.3.36.tar.gz" && cd llama_cpp_python-0.3.36 && \
      CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=14 \
      python3 -m pip install -q --no-deps --no-build-isolation --target "$SITE/llsite" . > "$OUT/llbuild.log" 2>&1
      rc=$?
      echo "build rc=$rc" >> "$OUT/llbuild.log"
      [ $rc = 0 ] && mv "$build/llama_cpp_python-0.3.36" "$LLAMA"
      [ -z "$build" ] || rm -rf "$build" ) &
  fi
  echo "== training a smollm2-shaped model on the second half of the text (75 s)"
  python3 - "$TEXT" "$WORK/m" <<'PY'
import gzip, shutil, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
meta = ".device/smollm2-meta"
text = gzip.decompress(open(sys.argv[1], "rb").read()).decode()
tokenizer = AutoTokenizer.from_pretrained(meta)
ids = torch.tensor(tokenizer(text[len(text) // 2:])["input_ids"], device="cuda")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(meta), dtype=torch.float32).cuda()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
batch, length, started, step = 16, 256, time.time(), 0
while time.time() - started < 75:
    starts = torch.randint(0, len(ids) - length - 1, (batch,), device="cuda")
    window = torch.stack([ids[s:s + length] for s in starts.tolist()])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=window, labels=window).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
print(f"trained {step} steps, last training loss {loss.item():.3f}")
model.to(torch.bfloat16).save_pretrained(sys.argv[2])
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f"{meta}/{name}", sys.argv[2])
PY
  echo "== analysis vs reading the same tensors"
  python3 -m scripts.bench.analyze "$WORK/m" --device both --repeat 3
  echo "== analyze, block entropies CUDA vs CPU"
  for d in cuda cpu; do python3 -m ewq_gguf analyze "$WORK/m" --device $d --json "$WORK/an-$d.json" > /dev/null; done
  python3 -c "
import json, sys; a=json.load(open(sys.argv[1]))['blocks']; b=json.load(open(sys.argv[2]))['blocks']
print('blocks', len(a), 'max relative difference cuda vs cpu:', max(abs(x[k]-y[k])/abs(y[k]) for x,y in zip(a,b) for k in ('softmax','histogram','zd')))" "$WORK/an-cuda.json" "$WORK/an-cpu.json"
  python3 -m ewq_gguf convert "$WORK/m" "$WORK/q8.gguf" --type Q8_0 --quiet --device cuda || exit 1
  python3 -m ewq_gguf convert "$WORK/m" "$WORK/ewq.gguf" --quiet --device cuda || exit 1
  wait
  tail -2 "$OUT/llbuild.log" 2>/dev/null
  export PYTHONPATH=$LLAMA:$PYTHONPATH
  echo "== llama.cpp perplexity, first 16 x 512 tokens of the text (not trained on): GPU offload vs CPU only"
  # CPU only needs the GPU hidden: with --gpu-layers 0 llama.cpp still sends large matrix products to a visible GPU.
  # llama_cpp is imported before numpy: on this machine the other order made the model load crash.
  cat > "$WORK/ppl.py" <<'PY'
import sys, llama_cpp  # noqa: F401
from ewq_gguf.validate import perplexity
r = perplexity(sys.argv[1], text=sys.argv[2], chunks=16, gpu_layers=int(sys.argv[3]), progress=False)
print(f"{sys.argv[1]}: gpu_layers={r.gpu_layers} threads={r.threads} PPL {r.ppl:.6f} +/- {r.ppl_se:.4f} {r.seconds:.2f} s")
PY
  for f in q8 ewq; do
    python3 "$WORK/ppl.py" "$WORK/$f.gguf" "$TEXT" -1 2> "$OUT/ppl-$f-gpu.err" || tail -3 "$OUT/ppl-$f-gpu.err"
    CUDA_VISIBLE_DEVICES= python3 "$WORK/ppl.py" "$WORK/$f.gguf" "$TEXT" 0 2> "$OUT/ppl-$f-cpu.err" || tail -3 "$OUT/ppl-$f-cpu.err"
  done
  ;;
large)
  echo "== 8 GB synthetic Llama, EWQ on CUDA"
  python3 -m scripts.bench.large --folder "$WORK/large" --method ewq --device cuda --keep \
    --tokenizer-from .device/smollm2-meta --results "$OUT/large.md"
  echo "== analysis vs reading the same tensors (8 GB checkpoint, page cache warm)"
  python3 -m scripts.bench.analyze "$WORK/large/synthetic-llama" --device cuda --repeat 2
  echo "== the same conversion on the CPU (16 cores)"
  python3 -m scripts.bench.large --folder "$WORK/large-cpu" --method ewq --device cpu \
    --tokenizer-from .device/smollm2-meta --results "$OUT/large-cpu.md"
  ;;
esac
