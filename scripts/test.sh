#!/usr/bin/env bash
# Install the test environment (.venv) and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
# The browser test drives Debian's Chromium (playwright's own browser download is not possible here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  else
    echo "note: install Debian's chromium for tests/test_browser.py" >&2
  fi
fi
mkdir -p tests/artifacts
exec .venv/bin/python -m pytest -q "$@"
