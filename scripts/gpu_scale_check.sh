#!/usr/bin/env bash
# On a 2-GPU host (the device tool's nvidia-h200-x2), issue 13's measurements in two calls:
#   scripts/gpu_scale_check.sh serve   carry .whl (prepare_gpu_wheels.sh):
#       1. one model over 2 GPUs: scripts/bench_engines.py, InternLM2-7B shape, pytorch (1 GPU) vs
#          pytorch@tp2 (tensor parallel over 2), 1 and 64 streams, in one run
#       2. replicas: scripts/launch_replicas.py --no-app, 1 replica (GPU 0) then 2 (GPUs 0 and 1)
#          behind LMDeploy's proxy, InternLM2-1.8B shape; 128 concurrent streams through the proxy
#          (bench_engines --backends api); then 2 replicas again, one killed mid-run
#   scripts/gpu_scale_check.sh train   carry .whl-train (prepare_gpu_wheels.sh --train):
#       the training pipeline, LoRA + DeepSpeed ZeRO-2, InternLM2-1.8B shape, gpus: 1 vs gpus: 2
# Output in $OUT (default /tmp/gpu-check): scale-*.txt. On one GPU: TP=0 REPLICA_SETS="0" runs the
# one-replica leg alone (the launcher, the proxy and the bench client, checked end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out" gpu-work
what=${1:-serve}
export PYTHONUNBUFFERED=1 INTERNLM2_CODE=$PWD/.whl/internlm2  # InternLM2 shapes copy its code from here (prepare_gpu_wheels.sh)
if [ "$what" = serve ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  tar xzf .whl/lmdeploy-pt.tgz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$out/scale-gpus.txt"
  [ "${TP:-1}" = 0 ] || python3 scripts/bench_engines.py --shape internlm2-7b --backends pytorch,pytorch@tp2 \
      --concurrency 1,64 --new-tokens 256 2>&1 | tee "$out/scale-tp.txt"
  [ -d gpu-work/internlm2-1.8b ] || python3 scripts/build_tiny_model.py --shape internlm2-1.8b --device cuda \
      --out gpu-work/internlm2-1.8b
  IFS=';' read -ra sets <<< "${REPLICA_SETS:-0;0 1}"
  for gpus in "${sets[@]}"; do
    n=$(echo $gpus | wc -w)
    python3 scripts/launch_replicas.py --model-path gpu-work/internlm2-1.8b --backend pytorch --gpus $gpus \
        --no-app --host 127.0.0.1 --proxy-port 18000 --log-dir "$out/replicas-$n" -- --session-len 4096 \
        --lmdeploy-max-batch-size 128 > "$out/launcher-$n.txt" 2>&1 &
    launcher=$!
    until grep -q "^ready:" "$out/launcher-$n.txt"; do sleep 2; kill -0 $launcher || { cat "$out/launcher-$n.txt"; exit 1; }; done
    python3 scripts/bench_engines.py --model-path gpu-work/internlm2-1.8b --backends api \
        --api-base-url http://127.0.0.1:18000/v1 --api-model internlm2-1.8b --concurrency 1,128 --new-tokens 256 \
        2>&1 | tee "$out/scale-replicas-$n.txt"
    kill -TERM $launcher; wait $launcher || true
  done
  [ ${#sets[@]} -lt 2 ] || python3 - "$out" <<'PY' | tee "$out/scale-table.txt"
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
def total(n):  # the 128-stream row's total tok/s
    for line in (out / f"scale-replicas-{n}.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "128":
            return float(parts[4].replace(",", ""))
one, two = total(1), total(2)
print(f"128 streams through the proxy: 1 replica {one:,.0f} tok/s, 2 replicas {two:,.0f} tok/s: {two / one:.2f}x")
PY
else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/train-site .whl-train/*.whl
  export PYTHONPATH=/tmp/train-site:$PWD
  [ -d gpu-work/base ] || python3 scripts/build_tiny_model.py --shape internlm2-1.8b --device cuda --out gpu-work/base
  python3 -m training.data.generate_self_cognition --name 小明 --description "由书生·浦语打造的助手" \
      --repeat 400 --out gpu-work/self.jsonl
  for gpus in 1 2; do
    python3 -m training.pipeline --config training/examples/internlm2_chat_1_8b_qlora.yaml \
        --set model_path=gpu-work/base --set "data_files=[gpu-work/self.jsonl]" --set expected_answer=小明 \
        --set evaluation_inputs=你是谁 --set general_questions=什么是机器学习 --set batch_size=1 \
        --set accumulative_counts=1 --set method=lora --set deepspeed=zero2 --set gpus=$gpus \
        --set max_steps=30 --set save_steps=15 --set max_length=8192 --set pack_to_max_length=true \
        --set activation_checkpointing=false --set log_interval=5 --set work_dir=gpu-work/zero2-$gpus \
        --out gpu-work/merged-zero2-$gpus > "$out/scale-train-$gpus.txt" 2>&1 && echo "gpus $gpus: ok" \
        || echo "gpus $gpus: FAILED"
    grep -E "^\[(summary|done)\]" "$out/scale-train-$gpus.txt" | tail -2
  done | tee "$out/scale-train.txt"
fi
