#!/usr/bin/env bash
# On the GPU host: install the offline wheels (scripts/prepare_gpu_wheels.sh), run the backend
# conformance suite on LMDeploy's PyTorch engine (and transformers on CUDA), then the benchmark.
#   scripts/gpu_check.sh [shape] [concurrency] [conformance|bench|all]   defaults: qwen2-1.5b 1,64 all
# transformers runs one generation at a time, so it decodes 16 tokens per stream, not 256.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
tar xzf .whl/lmdeploy-pt.tgz -C /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, lmdeploy; print(torch.__version__, transformers.__version__, lmdeploy.__version__)" | tee -a "$out/gpu.txt"
case "${3:-all}" in
  conformance|all) python3 -m pytest -q -p no:cacheprovider tests/test_conformance.py 2>&1 | tee "$out/conformance.txt" || true;;
esac
case "${3:-all}" in
  bench|all) python3 scripts/bench_engines.py --shape "${1:-qwen2-1.5b}" --backends transformers,pytorch,lmdeploy-pipeline \
      --concurrency "${2:-1,64}" --new-tokens 256 --backend-new-tokens transformers=16 2>&1 | tee "$out/bench.txt";;
esac
