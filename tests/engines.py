"""Build every backend available in this environment over the tiny model, for the conformance
suite: transformers directly, the api backend against our own server, and LMDeploy's
PyTorch engine where CUDA and LMDeploy are present (the GPU machine)."""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator

from infer_engine import Engine, EngineSettings, create_engine

from infer_engine.server import BackgroundServer


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def available_backends() -> list[str]:
    names = ["transformers", "api"]
    try:
        import torch
        if torch.cuda.is_available() and importlib.util.find_spec("lmdeploy"):
            names.append("pytorch")
    except ImportError:
        pass
    return names


def local_settings(model: str, backend: str = "transformers", session_len: int = 8192) -> EngineSettings:
    s = EngineSettings(model_path=str(model), backend=backend, session_len=session_len)
    if backend == "transformers" and _cuda():
        # fp32: what the suite compares across batch shapes (a batch of 8 against one stream,
        # the compiled one-stream path against the batch) is exact there; bf16 rounds each shape
        # differently and flips near-tied tokens of a random model
        s.dtype = "float32"
    if backend == "pytorch":
        s.lmdeploy.cache_max_entry_count = 0.2
        s.dtype = "float16"  # 3 more mantissa bits than bf16: fewer batch-dependent argmax flips
    return s


@contextmanager
def open_engine(name: str, model: str, session_len: int = 8192) -> Iterator[Engine]:
    if name in ("pytorch", "turbomind"):
        # same tokenizer and architecture, wider heads: GPU attention kernels want head_dim >= 32
        import tempfile

        from conftest import load_script
        from infer_engine.architectures import read_config
        tmp = tempfile.mkdtemp(prefix="tiny-gpu-")
        arch = "internlm2" if read_config(model).get("model_type") == "internlm2" else "qwen2"
        model = str(load_script("build_tiny_model").build(f"{tmp}/tiny-chat", hidden=256, heads=4, arch=arch))
    if name != "api":
        with create_engine(local_settings(model, name, session_len)) as engine:
            yield engine
        return
    from infer_engine.server import create_app
    with create_engine(local_settings(model, "transformers", session_len)) as served, \
            BackgroundServer(create_app(served, api_key="sk-test")) as server:
        s = EngineSettings(backend="api")
        s.api.base_url, s.api.api_key = server.base_url, "sk-test"
        with create_engine(s) as engine:
            engine.served = served  # the engine behind the server, for server-side checks
            yield engine


def synthetic(tokens_per_s: float = 0, reply_tokens: int = 0, name: str = "synthetic") -> Engine:
    """The model-free engine: 'You said: <question>' (then filler words up to reply_tokens)."""
    s = EngineSettings(backend="synthetic")
    s.synthetic.tokens_per_s, s.synthetic.reply_tokens, s.synthetic.model_name = tokens_per_s, reply_tokens, name
    return create_engine(s)


class Recorder(Engine):
    """Runs another engine's generations through the Engine protocol and notes how each
    session's last stream ended: (finish reason, completion tokens)."""

    def __init__(self, inner: Engine):
        super().__init__()
        self.inner, self.model_name, self.finished = inner, inner.model_name, {}
        self.prompt, self.session_len = inner.prompt, inner.session_len

    def generate(self, gen):
        return self.inner.generate(gen)

    def _stream(self, gen):  # every stream: stream_chat's and stream_prepared's
        for d in super()._stream(gen):
            if d.usage:
                self.finished[gen.session_id] = (d.usage.finish_reason, d.usage.completion_tokens)
            yield d

    def close(self):
        self.inner.close()
