#!/usr/bin/env bash
# Create (or update) the training environment .venv-train: XTuner 0.2.0 pins transformers 4.48,
# which cannot share an environment with the serving side. The two meet only through files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
constraints=${TRAIN_CONSTRAINTS:-constraints-train.txt}
want=$(cat requirements-train.txt "$constraints" training/compat.py | sha256sum | cut -c1-16)
[ -x .venv-train/bin/python ] || "$PY" -m venv .venv-train
if [ "$(cat .venv-train/.installed 2>/dev/null)" != "$want" ]; then
  .venv-train/bin/python -m pip install -q -c "$constraints" -r requirements-train.txt
  if ! .venv-train/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    # bitsandbytes (QLoRA) needs CUDA; on CPU, 0.45.0 beside new triton breaks peft's LoRA
    # creation ('No module named triton.ops'), so it goes.
    .venv-train/bin/python -m pip uninstall -q -y bitsandbytes >/dev/null 2>&1 || true
  elif .venv-train/bin/python -c "import torch, sys; sys.exit(0 if int(torch.version.cuda.split('.')[0]) >= 13 else 1)"; then
    # XTuner pins bitsandbytes 0.45.0, whose newest binary is CUDA 12.6: on a CUDA 13 torch QLoRA
    # needs 0.50.2 (CUDA 13.0/13.2 binaries), installed over the pin (pip reports the conflict)
    .venv-train/bin/python -m pip install -q --no-deps bitsandbytes==0.50.2
  fi
  # torchvision/torch CPU compatibility for every process of this environment
  site=$(.venv-train/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp training/compat.py "$site/sitecustomize.py"
  echo "$want" > .venv-train/.installed
fi
# the project itself, editable: chat-train and chat-llava from any folder
[ -x .venv-train/bin/chat-train ] || .venv-train/bin/python -m pip install -q --no-deps --no-build-isolation -e .
# `xtuner train CONFIG` (the tutorials' habit) with real exit codes: training/xtuner_cli.py
root=$(pwd)
cat > .venv-train/bin/xtuner <<SH
#!/usr/bin/env bash
export PYTHONPATH="$root\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$root/.venv-train/bin/python" -m training.xtuner_cli "\$@"
SH
chmod +x .venv-train/bin/xtuner
