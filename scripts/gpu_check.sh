#!/usr/bin/env bash
# Batched GPU check for the device machine (H100/H200, no internet). Prepare .device/ (git-ignored) with: the gguf
# wheel, the slimmed llama-cpp-python 0.3.36 sdist (without vendor/llama.cpp/{models,docs,benches}), the dev model's
# config/tokenizer files in .device/smollm2-meta and the evaluation text; then run with .device carried:
#   bash scripts/gpu_check.sh     (prints the tables quoted in docs/results.md, section "GPU runs")
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/gguf-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
TEXT=$PWD/.device/debian-reference.en.txt.gz
( cd /tmp && tar xzf $OLDPWD/.device/llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36 && \
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/llsite . > $OUT/llbuild.log 2>&1; echo "build rc=$?" >> $OUT/llbuild.log ) &
BUILD=$!
python3 - <<'PY'
import torch, json
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(".device/smollm2-meta")
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
m.to(torch.bfloat16).save_pretrained("/tmp/m")
import shutil
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f".device/smollm2-meta/{f}", "/tmp/m/")
print("random smollm2-shaped model written")
PY
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== analyze cuda vs cpu"
for d in cuda cpu; do /usr/bin/time -f "analyze $d: %e s" python3 -m ewq_gguf analyze /tmp/m --device $d --json /tmp/an-$d.json > /dev/null; done
python3 -c "
import json; a=json.load(open('/tmp/an-cuda.json'))['blocks']; b=json.load(open('/tmp/an-cpu.json'))['blocks']
d=max(abs(x[k]-y[k])/abs(y[k]) for x,y in zip(a,b) for k in ('softmax','histogram','zd'))
print('blocks', len(a), 'max relative difference of block entropies/ZD, cuda vs cpu:', d)
"
echo "== convert EWQ cuda vs cpu (time split)"
for d in cuda cpu; do /usr/bin/time -f "convert ewq $d: %e s" python3 -m ewq_gguf convert /tmp/m /tmp/ewq-$d.gguf --device $d --quiet; done
cmp /tmp/ewq-cuda.gguf /tmp/ewq-cpu.gguf && echo "EWQ files identical on cuda and cpu"
echo "== export from GPU"
timeout 200 python3 scripts/bench_export.py /tmp/m --device cuda --type Q4_K --repeats 1 2>&1 | tail -12
echo "== calibrate 32k tokens on cuda"
/usr/bin/time -f "calibrate cuda: %e s" python3 -m ewq_gguf calibrate /tmp/m --text $TEXT --tokens 32768 --device cuda --out /tmp/calib.json --quiet 2>&1 | tail -3
wait $BUILD; tail -3 $OUT/llbuild.log
export PYTHONPATH=/tmp/llsite:$PYTHONPATH
python3 -m ewq_gguf convert /tmp/m /tmp/q8.gguf --type Q8_0 --quiet --device cuda
echo "== perplexity GPU vs CPU"
for g in -1 0; do python3 -m ewq_gguf perplexity /tmp/q8.gguf --text $TEXT --chunks 8 --gpu-layers $g --json > $OUT/ppl$g.json 2>$OUT/ppl$g.err; cat $OUT/ppl$g.err | tail -3;cat $OUT/ppl$g.json; done
echo "== CUDA tests"
timeout 150 python3 -m pytest -q -x tests/test_analyse.py tests/test_quant_kquants_symmetric.py tests/test_quant_backends.py -k "cuda or CUDA" 2>&1 | tail -5
