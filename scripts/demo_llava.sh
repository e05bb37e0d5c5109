#!/usr/bin/env bash
# The offline LLaVA demo on a CPU, the tutorials' image Q&A part end to end: a tiny chat model
# and a tiny random CLIP vision tower, generated squares of four colours, XTuner's LLaVA
# pretrain (projector) then LoRA finetune, conversion to the Hugging Face llava layout, and
# before/after answers to "What colour is the square?" on squares it never saw. A few minutes.
#
#   scripts/demo_llava.sh            then serve it: .venv/bin/python -m infer_engine.server \
#                                        --model-path models/tiny-llava-shapes
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
scripts/setup_train_env.sh
[ -f models/tiny-chat/model.safetensors ] || .venv/bin/python scripts/build_tiny_model.py --out models/tiny-chat
[ -f models/tiny-clip/model.safetensors ] || .venv/bin/python scripts/build_tiny_model.py --clip --out models/tiny-clip
.venv-train/bin/python -m training.data.shapes data/shapes
.venv-train/bin/python -m training.data.llava validate data/shapes/train.json --image-folder data/shapes/images
# "before": the same LLM and vision tower joined by an untrained projector
.venv/bin/python scripts/build_tiny_model.py --llava models/tiny-chat --vision models/tiny-clip \
    --out models/tiny-llava-before >/dev/null
.venv-train/bin/python -m training.llava --config training/examples/llava_tiny_cpu.yaml --out models/tiny-llava-shapes
.venv/bin/python scripts/compare_answers.py models/tiny-llava-before models/tiny-llava-shapes \
    --images data/shapes/test.json --image-folder data/shapes/images --max-new-tokens 24 --expect-reference
