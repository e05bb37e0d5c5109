#!/usr/bin/env bash
# On the GPU host, the training side of issue 10 in two calls (the two wheel sets do not fit one
# carry; the warm machine keeps gpu-work/ between them):
#   scripts/gpu_train_check.sh train [steps] [max_length]   carry .whl-train (prepare_gpu_wheels.sh --train):
#       first scripts/bench_train.py: LoRA throughput at several packed lengths, with and without
#       activation checkpointing; then LoRA, full, QLoRA and LoRA + DeepSpeed ZeRO-2 of the
#       InternLM2-1.8B shape (random weights), each trained, scored, converted and merged by
#       training.pipeline; its [summary] line holds s/iter, tokens/s/GPU, peak memory and MFU
#   scripts/gpu_train_check.sh serve                         carry .whl (prepare_gpu_wheels.sh):
#       each merged model served by the LMDeploy PyTorch backend, asked the identity question
# Output in $OUT (default /tmp/gpu-check): train-<method>.log, serve.txt, table.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out" gpu-work
what=${1:-train}; steps=${2:-30}; maxlen=${3:-8192}
export PYTHONUNBUFFERED=1
runs=(${RUNS:-lora full qlora lora-zero2})  # RUNS="qlora full": some of them
if [ "$what" = train ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/train-site .whl-train/*.whl
  export PYTHONPATH=/tmp/train-site:$PWD
  python3 -c "import torch, transformers, xtuner, bitsandbytes, deepspeed; print(torch.__version__, torch.version.cuda, transformers.__version__, xtuner.__version__, bitsandbytes.__version__, deepspeed.__version__)" | tee "$out/train-env.txt"
  python3 -c "import torch, bitsandbytes as b; x = torch.randn(64, 64, device='cuda', dtype=torch.bfloat16); q, s = b.functional.quantize_4bit(x); print('bitsandbytes 4-bit on CUDA: ok', tuple(b.functional.dequantize_4bit(q, s).shape))" 2>&1 | tee -a "$out/train-env.txt" || true
  [ -d gpu-work/base ] || python3 scripts/build_tiny_model.py --shape internlm2-1.8b --device cuda --out gpu-work/base
  python3 -m training.data.generate_self_cognition --name 小明 --description "由书生·浦语打造的助手" \
      --repeat 200 --out gpu-work/self.jsonl
  common=(--config training/examples/internlm2_chat_1_8b_qlora.yaml --set model_path=gpu-work/base
          --set "data_files=[gpu-work/self.jsonl]" --set expected_answer=小明 --set evaluation_inputs=你是谁
          --set general_questions=什么是机器学习 --set batch_size=1 --set accumulative_counts=1)
  [ -n "${RUNS:-}" ] || python3 scripts/bench_train.py "${common[@]}" --steps 12 --set log_interval=2 --work gpu-work/bench \
      --shape method=lora,max_length=4096,activation_checkpointing=true \
      --shape method=lora,max_length=8192,activation_checkpointing=false \
      --shape method=lora,max_length=16384,activation_checkpointing=false 2>&1 \
      | grep -vE "^\[train\]" | tee "$out/bench_train.txt" || true
  for run in "${runs[@]}"; do
    method=${run%-zero2}; ds=""; [ "$run" = lora-zero2 ] && ds=zero2
    python3 -m training.pipeline "${common[@]}" --set method="$method" --set deepspeed="$ds" \
        --set max_steps="$steps" --set save_steps=$((steps / 2)) --set max_length="$maxlen" \
        --set pack_to_max_length=true --set activation_checkpointing=false --set log_interval=5 --set work_dir="gpu-work/$run" \
        --out "gpu-work/merged-$run" > "$out/train-$run.log" 2>&1 && echo "$run: ok" || echo "$run: FAILED (see train-$run.log)"
    grep -E "^\[(summary|done|warning)\]|error" "$out/train-$run.log" | tail -3
  done | tee "$out/table.txt"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/train-env.txt"
else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  tar xzf .whl/lmdeploy-pt.tgz -C /tmp/site
  export PYTHONPATH=/tmp/site
  for run in "${runs[@]}"; do
    [ -d "gpu-work/merged-$run" ] || { echo "$run: no merged model (train first)"; continue; }
    python3 scripts/compare_answers.py gpu-work/base "gpu-work/merged-$run" --backend pytorch \
        -q 你是谁 -q 请介绍一下你自己 --expect 小明 && echo "$run: served on LMDeploy, answers 小明" \
        || echo "$run: served on LMDeploy, identity NOT answered"
  done 2>&1 | tee "$out/serve.txt"
fi
