#!/usr/bin/env bash
# On the GPU host: install the offline wheels (scripts/prepare_gpu_wheels.sh, carried as .whl), then
#   tests   the engine test files on the host's stack: every backend it has (LMDeploy's PyTorch
#           engine, transformers, api) on the Qwen2 and InternLM2 tiny models
#   bench   scripts/bench_engines.py on InternLM2's real shape (random weights): transformers
#           (a lone stream compiled, the batch for more), transformers --bits 4, LMDeploy's engine
#   app     scripts/bench_app.py: engine vs our server vs the Gradio app, in one process and as 4 behind
#           one port (needs the --gradio wheels; APP_PATHS, APP_VISITORS, APP_ARGS: other paths, visitors,
#           engine flags)
#   scripts/gpu_check.sh [shape] [concurrency] [tests|bench|app|all]   defaults: internlm2-1.8b 1,16 tests,bench
# WHL names the wheel folder (default .whl; a copy without the wheels a part does not need fits the
# device tool's 64 MiB).
# Each part's output lands in $OUT (default /tmp/gpu-check), each under its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
shape=${1:-internlm2-1.8b}; conc=${2:-1,16}; what=${3:-tests,bench}
whl=${WHL:-.whl}
if [ ! -d /tmp/site/lmdeploy ]; then  # once per machine
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl"/*.whl
  tar xzf "$whl"/lmdeploy-pt.tgz -C /tmp/site
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False INTERNLM2_CODE=$PWD/$whl/internlm2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, lmdeploy, peft; print(torch.__version__, transformers.__version__, lmdeploy.__version__, peft.__version__)" \
    | tee -a "$out/gpu.txt"
case ,$what, in *,tests,*|*,all,*)
  timeout "${TESTS_S:-420}" python3 -m pytest -q -p no:cacheprovider --durations=15 tests/test_conformance.py \
      tests/test_openai_protocol.py tests/test_transformers_backend.py 2>&1 | grep -v "Loading weights" \
      | tee "$out/tests.txt";;
esac
case ,$what, in *,bench,*|*,all,*)
  timeout "${BENCH_S:-300}" python3 scripts/bench_engines.py --shape "$shape" \
      --backends transformers,transformers@bits4,pytorch --concurrency "$conc" --new-tokens 256 2>&1 \
      | grep -v "Loading weights\|Warming up" | tee "$out/bench.txt";;
esac
case ,$what, in *,app,*|*,all,*)
  [ -f "/tmp/$shape/config.json" ] || python3 scripts/build_tiny_model.py --shape "$shape" --out "/tmp/$shape" >/dev/null
  tag=${APP_TAG:-bench_app}
  timeout "${APP_S:-400}" python3 scripts/bench_app.py --backend pytorch --model-path "/tmp/$shape" --new-tokens 256 \
      --users "$conc" --paths "${APP_PATHS:-engine,server,app,app@4}" --visitors "${APP_VISITORS:-new,returning}" \
      --client-procs 8 --logs "/tmp/logs-$tag" --json "$out/$tag.json" ${APP_ARGS:-} 2>&1 | tee "$out/$tag.txt"
  tail -n 4 /tmp/logs-"$tag"/*.log > "$out/$tag-logs.txt" 2>&1;;
esac
