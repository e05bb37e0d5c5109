#!/usr/bin/env bash
# The end-to-end demo, offline on a CPU: build a tiny chat model and pretrain it briefly, make
# a self-cognition dataset for NAME, fine-tune it with XTuner (LoRA), pick the best checkpoint,
# convert and merge, print before/after answers, then serve the fine-tuned model in the chat
# app (with a Compare tab against the base model) on http://127.0.0.1:7860.
#
#   scripts/demo.sh [--name 小明] [--description "…"]   the whole flow, ending in the app
#   scripts/demo.sh --no-finetune [--cli | --serve]       just the tiny model: app, terminal or API
# Other flags go to app.py (e.g. --port 7861).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="小明"; DESC="由你亲手微调出来的AI助手"; FINETUNE=1; MODE=app; APP_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2;;
    --description) DESC="$2"; shift 2;;
    --no-finetune) FINETUNE=0; shift;;
    --cli) MODE=cli; shift;;
    --serve) MODE=serve; shift;;
    *) APP_ARGS+=("$1"); shift;;
  esac
done

scripts/setup_env.sh
if [ $FINETUNE = 0 ]; then
  [ -f models/tiny-chat/model.safetensors ] || .venv/bin/python scripts/build_tiny_model.py --out models/tiny-chat
  case $MODE in
    cli) exec .venv/bin/python -m infer_engine.chat --model-path models/tiny-chat "${APP_ARGS[@]}";;
    serve) exec .venv/bin/python -m infer_engine.server --model-path models/tiny-chat "${APP_ARGS[@]}";;
    *) exec .venv/bin/python app.py --model-path models/tiny-chat --host 127.0.0.1 --title "Tiny chat" "${APP_ARGS[@]}";;
  esac
fi

scripts/setup_train_env.sh
if [ ! -f models/tiny-base/model.safetensors ]; then
  .venv/bin/python scripts/build_tiny_model.py --hidden 128 --out models/tiny-random
  .venv-train/bin/python -m training.pretrain_tiny models/tiny-random --out models/tiny-base
fi
.venv-train/bin/python -m training.data.generate_self_cognition --name "$NAME" --description "$DESC" \
    --repeat 3 --mix training/data/general_chat.jsonl --mix-ratio 0.3 --out data/self_cognition.jsonl
rm -rf work_dirs/tiny-demo
.venv-train/bin/python -m training.pipeline --config training/examples/tiny_cpu.yaml \
    --set model_path=models/tiny-base --set "data_files=[data/self_cognition.jsonl]" \
    --set "expected_answer=$NAME" --set work_dir=work_dirs/tiny-demo --out models/tiny-finetuned
.venv/bin/python scripts/compare_answers.py models/tiny-base models/tiny-finetuned
exec .venv/bin/python app.py --model-path models/tiny-finetuned --compare-model-path models/tiny-base \
    --model-label "fine-tuned ($NAME)" --compare-label "base" --host 127.0.0.1 \
    --title "$NAME" --examples "你是谁|Who are you?|请用一句话介绍上海" --temperature 0 "${APP_ARGS[@]}"
