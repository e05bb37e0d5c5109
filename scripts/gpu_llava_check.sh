#!/usr/bin/env bash
# On the GPU host, issue 12's real-shape LLaVA run in two calls (the two wheel sets do not fit
# one carry; the warm machine keeps gpu-work/ between them):
#   scripts/gpu_llava_check.sh train [finetune_steps]   carry .whl-train (prepare_gpu_wheels.sh --train):
#       random weights of InternLM2-1.8B's widths (Qwen2 architecture: transformers has the class,
#       so the result converts to the llava layout) and of CLIP ViT-L/14-336, generated squares;
#       training.llava with the tutorial's settings (QLoRA, batch 16, r 512): projector pretrain,
#       finetune, pth_to_hf, llava-hf; its [summary] lines hold s/iter, tokens/s/GPU, peak memory.
#       No evaluation image: XTuner's EvaluateChatHook feeds the fp32 tower's features to the
#       4-bit LLM outside autocast, and a Qwen2-architecture model's lm_head (not quantized,
#       fp16) then refuses fp32 input; InternLM2's output layer is quantized too, so the
#       tutorial's own run does not meet it (measured here: "expected scalar type Float but found Half").
#   scripts/gpu_llava_check.sh serve                    carry .whl (prepare_gpu_wheels.sh):
#       the llava-hf result asked about test squares on transformers (CUDA) and on LMDeploy's
#       VLM pipeline (PyTorch engine), and one image turn through our OpenAI server
# Output in $OUT (default /tmp/gpu-check): llava-train.log, llava-serve.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out" gpu-work
what=${1:-train}; steps=${2:-200}
export PYTHONUNBUFFERED=1
if [ "$what" = train ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/train-site .whl-train/*.whl
  export PYTHONPATH=/tmp/train-site:$PWD
  [ -d gpu-work/base ] || python3 scripts/build_tiny_model.py --shape internlm2-1.8b --arch qwen2 --device cuda --out gpu-work/base
  [ -d gpu-work/clip ] || python3 scripts/build_tiny_model.py --clip --shape clip-vit-l-14-336 --device cuda \
      --out gpu-work/clip
  python3 -m training.data.shapes gpu-work/shapes --per-colour 100
  python3 -m training.llava --config training/examples/llava_internlm2_1_8b_qlora.yaml \
      --set llm_path=gpu-work/base --set visual_encoder_path=gpu-work/clip \
      --set data_path=gpu-work/shapes/train.json --set image_folder=gpu-work/shapes/images \
      --set evaluation_image= --set 'evaluation_inputs=["What colour is the square?"]' \
      --set pretrain_steps=30 --set finetune_steps="$steps" --set work_dir=gpu-work/llava \
      --out gpu-work/llava-hf > "$out/llava-train.log" 2>&1 && echo "llava: ok" || echo "llava: FAILED"
  grep -E "^\[(data|pretrain|finetune|summary|done|error)\]|rror" "$out/llava-train.log" | tail -8
  for f in gpu-work/llava/*.log; do echo "== $f"; grep -E "Iter\(train\)|Error|error" "$f" | tail -4; done
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
else
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  tar xzf .whl/lmdeploy-pt.tgz -C /tmp/site
  export PYTHONPATH=/tmp/site
  [ -d gpu-work/llava-hf ] || { echo "no gpu-work/llava-hf: train first"; exit 1; }
  # a file, not stdin: LMDeploy's engine starts processes that import __main__
  cat > gpu-work/llava_serve.py <<'PY'
import json
import os
import time
from pathlib import Path

from infer_engine import EngineSettings, SamplingParams, create_engine
from infer_engine.images import data_url


def main():
    recs = json.loads(Path("gpu-work/shapes/test.json").read_text())[:4]
    for backend in os.environ.get("BACKENDS", "transformers pytorch").split():
        try:
            t0 = time.time()
            with create_engine(EngineSettings(model_path="gpu-work/llava-hf", backend=backend,
                                              session_len=4096)) as e:
                print(f"{backend}: loaded in {time.time() - t0:.0f} s, accepts_images={e.accepts_images}", flush=True)
                for r in recs:
                    url = data_url(Path("gpu-work/shapes/images") / r["image"])
                    question = r["conversations"][0]["value"].replace("<image>", "").strip()
                    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": question}]}]
                    text, usage = e.chat(msg, SamplingParams(max_new_tokens=12, temperature=0))
                    print(f"  {r['image']}: {text!r} (prompt {usage.prompt_tokens} tokens, first token "
                          f"{usage.ttft_s * 1000:.0f} ms, {usage.decode_tokens_per_s or 0:.0f} tok/s)", flush=True)
        except Exception as exc:  # say exactly why, then go on with the other backend
            print(f"{backend}: FAILED {type(exc).__name__}: {str(exc)[:600]}", flush=True)


if __name__ == "__main__":
    main()
PY
  PYTHONPATH=/tmp/site:$PWD python3 gpu-work/llava_serve.py 2>&1 | tee "$out/llava-serve.txt"
fi
