#!/usr/bin/env bash
# Build the offline wheel set that scripts/gpu_check.sh installs on the GPU host (which has
# torch, transformers and peft but no package index): LMDeploy's PyTorch engine and Gradio
# (shared wheels.sh) plus pytest, loguru and uvicorn's fast loop/parser. Output: .whl/ (ignored
# by git; pass it in the device tool's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu-host/wheels.sh --gradio .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d .whl pytest==9.2.0 iniconfig pluggy packaging pygments httpx2 httpcore2 truststore h11 sniffio \
    loguru==0.7.3 anyio idna
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl uvloop==0.23.0 httptools==0.9.0 psutil
du -sh .whl
