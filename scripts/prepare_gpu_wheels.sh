#!/usr/bin/env bash
# Build the offline wheel set that scripts/gpu_check.sh installs on the GPU host (which has
# torch, transformers and peft but no package index): LMDeploy's PyTorch engine (shared
# wheels.sh) plus pytest. Output: .whl/ (ignored by git; pass it in the device tool's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu-host/wheels.sh .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d .whl pytest==9.2.0 iniconfig pluggy packaging pygments httpx2 httpcore2 truststore h11 sniffio
du -sh .whl
