#!/usr/bin/env bash
# Install both environments and run every test: the serving side in .venv (engine, server,
# app, browser, and the real XTuner train -> convert -> merge on the tiny model), then the
# training side's own tests in .venv-train. Extra args go to the serving-side pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
scripts/setup_train_env.sh
# The browser test drives Debian's Chromium (playwright's own browser download is not possible here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  else
    echo "note: install Debian's chromium for tests/test_browser.py" >&2
  fi
fi
mkdir -p tests/artifacts
# Static check first: the LMDeploy and GPU code paths do not run on this CPU.
.venv/bin/ruff check .
.venv-train/bin/python -m pytest -q -p no:cacheprovider tests/training
.venv/bin/python -m pytest -q --ignore=tests/training "$@"
