#!/usr/bin/env bash
# Create (or update) the serving environment in .venv for CPU use and tests.
# Usage: scripts/setup_env.sh [test]      -- "test" adds pytest, playwright and LMDeploy's config classes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
kind=${1:-cpu}
stamp=.venv/.installed-$kind
want=$(cat requirements-cpu.txt requirements-cpu-nodeps.txt requirements-test.txt requirements-lmdeploy-nodeps.txt | sha256sum | cut -c1-16)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ "$kind" = test ]; then
    .venv/bin/python -m pip install -q -r requirements-test.txt
    # LMDeploy without its dependencies: only its config classes are used on CPU.
    .venv/bin/python -m pip install -q --no-deps -r requirements-lmdeploy-nodeps.txt
  else
    .venv/bin/python -m pip install -q -r requirements-cpu.txt
  fi
  .venv/bin/python -m pip install -q --no-deps -r requirements-cpu-nodeps.txt
  echo "$want" > "$stamp"
fi
# the project itself, editable: chat-app, chat-server, chat-cli and `python -m ...` from any folder
[ -x .venv/bin/chat-app ] || .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
