#!/usr/bin/env bash
# The main job, for now: set up the serving environment, build the tiny offline model, and
# chat with it in the terminal -- or, with --serve, start the OpenAI-compatible API server.
#   scripts/demo.sh            # terminal chat
#   scripts/demo.sh --serve    # http://127.0.0.1:23333/v1 (any extra flags go to the server)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
[ -f models/tiny-chat/model.safetensors ] || .venv/bin/python scripts/build_tiny_model.py --out models/tiny-chat
if [ "${1:-}" = --serve ]; then
  shift
  exec .venv/bin/python -m infer_engine.server --model-path models/tiny-chat "$@"
fi
exec .venv/bin/python -m infer_engine.chat --model-path models/tiny-chat "$@"
