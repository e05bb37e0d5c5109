#!/usr/bin/env bash
# On the GPU host: install the offline wheels (scripts/prepare_gpu_wheels.sh), then
#   conformance  the backend conformance suite on LMDeploy's PyTorch engine (and transformers on CUDA)
#   bench        scripts/bench_engines.py: transformers (continuous batching), ours on LMDeploy, LMDeploy's pipeline
#   app          scripts/bench_app.py: engine vs our server vs the Gradio app, LMDeploy's PyTorch engine
#   scripts/gpu_check.sh [shape] [concurrency] [conformance|bench|app|all]   defaults: internlm2-1.8b 1,16,64 all
# Each part's output lands in $OUT (default /tmp/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
shape=${1:-internlm2-1.8b}; conc=${2:-1,16,64}; what=${3:-all}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
tar xzf .whl/lmdeploy-pt.tgz -C /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, lmdeploy; print(torch.__version__, transformers.__version__, lmdeploy.__version__)" | tee -a "$out/gpu.txt"
case $what in conformance|all)
  python3 -m pytest -q -p no:cacheprovider tests/test_conformance.py tests/test_transformers_backend.py 2>&1 \
      | tee "$out/conformance.txt" || true;;
esac
case $what in bench|all)
  python3 scripts/bench_engines.py --shape "$shape" --backends transformers,pytorch,lmdeploy-pipeline \
      --concurrency "$conc" --new-tokens 256 2>&1 | tee "$out/bench.txt";;
esac
case $what in app|all)
  python3 scripts/build_tiny_model.py --shape "$shape" --out "/tmp/$shape" >/dev/null
  python3 scripts/bench_app.py --backend pytorch --model-path "/tmp/$shape" --new-tokens 256 --users "$conc" \
      --logs "$out" --json "$out/bench_app.json" 2>&1 | tee "$out/bench_app.txt";;
esac
