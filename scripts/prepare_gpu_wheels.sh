#!/usr/bin/env bash
# Build the offline wheel sets for the GPU host (it has torch, transformers and peft but no
# package index). Pass the output folder in the device tool's carry.
#   scripts/prepare_gpu_wheels.sh [--gradio] serving: LMDeploy's PyTorch engine (shared wheels.sh), Gradio
#                                          with --gradio, pytest, loguru, uvicorn's fast loop/parser,
#                                          bitsandbytes, InternLM2's own code files -> .whl/
#   scripts/prepare_gpu_wheels.sh --train  training (scripts/gpu_train_check.sh installs it into its own
#                                          target dir, first on PYTHONPATH) -> .whl-train/
set -euo pipefail
cd "$(dirname "$0")/.."
any=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any)
linux=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
if [ "${1:-}" = --train ]; then
  d=.whl-train; rm -rf "$d"; mkdir -p "$d"
  # XTuner and what it brings beyond the GPU image (torch, peft, numpy, pandas, pyarrow, opencv)
  python3 -m pip download -q "${any[@]}" -d "$d" xtuner==0.2.0 transformers==4.48.0 huggingface_hub==0.36.2 \
      mmengine==0.10.6 datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 addict==2.4.0 yapf==0.43.0 \
      termcolor==3.3.0 loguru==0.7.3 openpyxl==3.1.5 et_xmlfile==2.0.0 platformdirs==4.14.9 \
      hjson py-cpuinfo pydantic==2.14.4 annotated-types typing-inspection
  python3 -m pip download -q "${linux[@]}" -d "$d" tokenizers==0.21.4 msgpack ninja pydantic-core==2.50.5
  # only sdists on PyPI: built here as pure Python (DeepSpeed's ops build just in time on the GPU)
  python3 -m pip wheel -q --no-deps -w "$d" transformers-stream-generator==0.0.5
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$d" deepspeed==0.16.2
  # QLoRA on a CUDA 13 driver: XTuner pins bitsandbytes 0.45.0, whose newest binary is CUDA 12.6;
  # 0.50.2 ships CUDA 13.0/13.2 ones. Only those (and the CPU one) are kept: 43 MB -> a few.
  python3 -m pip download -q "${linux[@]}" -d "$d" bitsandbytes==0.50.2
  python3 scripts/slim_wheel.py "$d"/bitsandbytes-*.whl --keep 'libbitsandbytes_(cpu|cuda13\d)\.so$' \
      --drop 'libbitsandbytes_.*\.so$'
  du -sh "$d"; exit 0
fi
# serving: LMDeploy's PyTorch engine (the shared wheels.sh), Gradio with --gradio (the app; 32 MB:
# leave it out when the app is not run, the device tool carries 64 MiB at most)
bash ../shared/gpu-host/wheels.sh ${1:+"$1"} .whl
python3 -m pip download -q "${any[@]}" -d .whl pytest==9.2.0 iniconfig pluggy packaging pygments httpx2 \
    httpcore2 truststore h11 sniffio loguru==0.7.3 anyio idna jsonschema==4.26.0 jsonschema-specifications \
    referencing
python3 -m pip download -q "${linux[@]}" -d .whl uvloop==0.23.0 httptools==0.9.0 psutil rpds-py
# LMDeploy's request router (lmdeploy serve proxy, scripts/launch_replicas.py): aiohttp and its parts
python3 -m pip download -q "${any[@]}" -d .whl aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0
python3 -m pip download -q "${linux[@]}" -d .whl aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 \
    frozenlist==1.8.0 propcache==0.5.4
# --bits 4|8 on the transformers backend: bitsandbytes with its CUDA 13 binaries only (43 MB -> a few)
python3 -m pip download -q "${linux[@]}" -d .whl bitsandbytes==0.50.2
python3 scripts/slim_wheel.py .whl/bitsandbytes-*.whl --keep 'libbitsandbytes_(cpu|cuda13\d)\.so$' \
    --drop 'libbitsandbytes_.*\.so$'
# InternLM2's own configuration/modeling files, as XTuner installs them (build_tiny_model.py
# --arch internlm2 copies them into the model folder): INTERNLM2_CODE=.whl/internlm2 on the host
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q "${any[@]}" -d "$tmp" xtuner==0.2.0
mkdir -p .whl/internlm2
unzip -q -j -o "$tmp"/xtuner-*.whl 'xtuner/_lite/modelings/internlm2/configuration_internlm2.py' \
    'xtuner/_lite/modelings/internlm2/modeling_internlm2.py' -d .whl/internlm2
du -sh .whl
