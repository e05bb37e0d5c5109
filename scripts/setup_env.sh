#!/usr/bin/env bash
# Create (or update) the serving environment in .venv for CPU use and tests.
# Usage: scripts/setup_env.sh [test]      -- "test" adds pytest and LMDeploy's config classes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
if [ "${1:-}" = test ]; then
  pip install -q -r requirements-test.txt
  # LMDeploy without its dependencies: only its config classes are used on CPU.
  pip install -q --no-deps -r requirements-lmdeploy-nodeps.txt
else
  pip install -q -r requirements-cpu.txt
fi
