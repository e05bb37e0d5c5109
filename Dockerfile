# GPU image: python app.py with --backend auto: LMDeploy's PyTorch engine, the one run on our GPU
# host (H200: InternLM2 and Qwen2 served, the engine test files passing). TurboMind is installed
# too (ENGINE_BACKEND=turbomind) but has never been run here, and this image has never been built
# here (no Docker engine on our machines). Mount the model folder at /models.
#   docker build -t chat-app .
#   docker run --gpus all -p 7860:7860 -v $PWD/models/merged:/models/model chat-app
#   docker run --gpus all -p 7860:7860 -v $HOME/.cache/chat-models:/models/cache \
#       -e ENGINE_MODEL_PATH=modelscope://Shanghai_AI_Laboratory/internlm2-chat-1_8b chat-app
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    APP_HOST=0.0.0.0 APP_PORT=7860 \
    ENGINE_MODEL_PATH=/models/model ENGINE_BACKEND=auto MODEL_CACHE_DIR=/models/cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git git-lfs curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* && git lfs install --system

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY app.py ./
COPY chat_ui chat_ui
COPY infer_engine infer_engine

VOLUME ["/models"]
EXPOSE 7860
# the first start may load (or download) a model for minutes
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS http://127.0.0.1:7860/ >/dev/null || exit 1
ENTRYPOINT ["python", "app.py"]
