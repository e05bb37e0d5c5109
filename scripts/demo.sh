#!/usr/bin/env bash
# Set up the serving environment, build the tiny offline model, and chat with it: in the
# Gradio app, in the terminal (--cli), or through the OpenAI-compatible API server (--serve).
#   scripts/demo.sh            # the chat app on http://127.0.0.1:7860 (extra flags go to app.py)
#   scripts/demo.sh --cli      # terminal chat
#   scripts/demo.sh --serve    # http://127.0.0.1:23333/v1 (any extra flags go to the server)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
[ -f models/tiny-chat/model.safetensors ] || .venv/bin/python scripts/build_tiny_model.py --out models/tiny-chat
case "${1:-}" in
  --serve) shift; exec .venv/bin/python -m infer_engine.server --model-path models/tiny-chat "$@";;
  --cli) shift; exec .venv/bin/python -m infer_engine.chat --model-path models/tiny-chat "$@";;
  *) exec .venv/bin/python app.py --model-path models/tiny-chat --host 127.0.0.1 --title "Tiny chat" "$@";;
esac
