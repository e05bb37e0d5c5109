#!/usr/bin/env bash
# The end-to-end demo, offline on a CPU: build a tiny chat model and pretrain it briefly, make
# a self-cognition dataset for NAME, fine-tune it with XTuner (LoRA), pick the best checkpoint,
# convert and merge, print before/after answers, then serve the fine-tuned model in the chat
# app (with a Compare tab against the base model) on http://127.0.0.1:7860.
#
#   scripts/demo.sh [--name 小明] [--description "…"] [--arch internlm2|qwen2]   the whole flow
#   scripts/demo.sh --no-finetune [--arch qwen2|internlm2] [--cli | --serve]      just the tiny model
# The tiny model is an InternLM2 by default (the tutorials' family: its own modeling code, copied
# from the installed XTuner, runs in training; serving loads it with transformers' own classes);
# --arch qwen2 runs the same flow on a Qwen2. Other flags go to app.py (e.g. --port 7861).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="小明"; DESC="由你亲手微调出来的AI助手"; FINETUNE=1; MODE=app; ARCH=""; APP_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --description) DESC="$2"; shift 2;;
    --arch) ARCH="$2"; shift 2;;
    --no-finetune) FINETUNE=0; shift;;
    --cli) MODE=cli; shift;;
    --serve) MODE=serve; shift;;
    *) APP_ARGS+=("$1"); shift;;
  esac
done
case "${ARCH:-x}" in internlm2|qwen2|x) ;; *) echo "error: --arch must be internlm2 or qwen2, got '$ARCH'" >&2; exit 2;; esac

scripts/setup_env.sh
if [ $FINETUNE = 0 ]; then
  ARCH=${ARCH:-qwen2}  # a Qwen2 needs no training environment; an InternLM2 copies XTuner's files from it
  MODEL=models/tiny-chat; [ "$ARCH" = qwen2 ] || { MODEL=models/tiny-internlm2-chat; scripts/setup_train_env.sh; }
  [ -f $MODEL/model.safetensors ] || .venv/bin/python scripts/build_tiny_model.py --arch "$ARCH" --out $MODEL
  case $MODE in
    cli) exec .venv/bin/python -m infer_engine.chat --model-path $MODEL "${APP_ARGS[@]}";;
    serve) exec .venv/bin/python -m infer_engine.server --model-path $MODEL "${APP_ARGS[@]}";;
    *) exec .venv/bin/python app.py --model-path $MODEL --host 127.0.0.1 --title "Tiny chat" "${APP_ARGS[@]}";;
  esac
fi

ARCH=${ARCH:-internlm2}
M=models/tiny-$ARCH
scripts/setup_train_env.sh
if [ ! -f $M-base/model.safetensors ]; then
  .venv/bin/python scripts/build_tiny_model.py --arch "$ARCH" --hidden 128 --out $M-random
  .venv-train/bin/python -m training.pretrain_tiny $M-random --out $M-base
fi
.venv-train/bin/python -m training.data.generate_self_cognition --name "$NAME" --description "$DESC" \
    --repeat 3 --mix training/data/general_chat.jsonl --mix-ratio 0.5 --out data/self_cognition.jsonl
rm -rf work_dirs/tiny-demo
.venv-train/bin/python -m training.pipeline --config training/examples/tiny_cpu.yaml \
    --set model_path=$M-base --set "data_files=[data/self_cognition.jsonl]" \
    --set "expected_answer=$NAME" --set work_dir=work_dirs/tiny-demo --out $M-finetuned
.venv/bin/python scripts/compare_answers.py $M-base $M-finetuned
exec .venv/bin/python app.py --model-path $M-finetuned --compare-model-path $M-base \
    --model-label "fine-tuned ($NAME)" --compare-label "base" --host 127.0.0.1 \
    --title "$NAME" --examples "你是谁|Who are you?|请用一句话介绍上海" --temperature 0 "${APP_ARGS[@]}"
