#!/usr/bin/env bash
# One prepared GPU check (issue 9, item 7), for a lent GPU machine:
#   1. the real-model benchmark (tests/benchmarks/bench_vs_trl.py --sides rlfuse) on CUDA in
#      bf16-mixed and fp32: rlfuse alone, absolute tokens/s (TRL is not installed there);
#   2. the kernel check and bandwidth benchmark (tests/benchmarks/bench_kernels_gpu.py): the
#      bf16 log-prob forward's share of HBM peak (the bar: >= 80%).
#
#   bash tests/benchmarks/gpu_check.sh [MODEL_DIR]     (from the repository root; ~6-8 minutes)
#
# MODEL_DIR: a save_pretrained folder (default: SmolLM2 as made by get_smollm2.py). A GPU
# machine that cannot download and has no room to carry the weights gets the folder's
# config + tokenizer files only (a few MB): the script then builds a randomly initialised model
# of that config -- the same shapes, so the same speed (the text it samples is noise; every
# step still generates max_new_tokens). Results go to $OUT (default /tmp/rlfuse-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/rlfuse-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODEL=${1:-${RLFUSE_SMOLLM2:-/work/models/smollm2-135m}}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if ! "$PY" -c "import rlfuse" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 \
    || echo "[gpu_check] could not install rlfuse; section 1 will fail" >&2
fi
"$PY" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|triton|hydra-core|pluggy) " | tee -a "$OUT/gpu.txt"

if ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  echo "[gpu_check] $MODEL has no weights: building a random-init model of its config"
  "$PY" - "$MODEL" /tmp/rlfuse-gpu-model <<'PYEOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
print(dst)
PYEOF
  MODEL=/tmp/rlfuse-gpu-model
fi

echo "## 1. real-model benchmark on CUDA (rlfuse alone)" | tee "$OUT/real_model.md"
timeout 300 "$PY" tests/benchmarks/bench_vs_trl.py --model "$MODEL" --sides rlfuse --device cuda \
  --precisions bf16-mixed,fp32 --repeats 1 --steps 6 --warmup 2 --json "$OUT/real_model.json" 2>&1 \
  | grep -v "^WARN" | tee -a "$OUT/real_model.md"

echo "## 2. kernels: correctness and bandwidth" | tee "$OUT/kernels.md"
timeout 300 "$PY" tests/benchmarks/bench_kernels_gpu.py 2>&1 | tee -a "$OUT/kernels.md"
rm -rf /tmp/rlfuse-gpu-model
