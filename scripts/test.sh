#!/usr/bin/env bash
# Install the test environment (.venv) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
exec .venv/bin/python -m pytest -q "$@"
