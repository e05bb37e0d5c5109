"""The api backend against real HTTP servers on 127.0.0.1: retries only before the first token
and only on connection errors / 5xx; clear errors for 400/401/404."""
from __future__ import annotations

import time

import pytest

from infer_engine.server import BackgroundServer, free_port
from engines import local_settings
from infer_engine import (AuthenticationFailed, BackendUnavailable, EngineSettings, InvalidRequest,
                          ModelNotFound, SamplingParams, create_engine)
from infer_engine.server import create_app

MSGS = [{"role": "user", "content": "hi"}]
SP = SamplingParams(max_new_tokens=8, temperature=0)


class FailFirst:
    """ASGI wrapper: answer the first `n` chat requests with `status`, count every request."""

    def __init__(self, app, n: int, status: int = 503):
        self.app, self.n, self.status, self.chat_requests = app, n, status, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            self.chat_requests += 1
            if self.chat_requests <= self.n:
                await send({"type": "http.response.start", "status": self.status,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body",
                            "body": b'{"error": {"message": "overloaded", "type": "server_error"}}'})
                return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def served(tiny_model):
    with create_engine(local_settings(tiny_model)) as engine:
        yield engine


def api_engine(base_url: str, key: str = "k", model: str = "", retries: int = 3):
    s = EngineSettings(backend="api")
    s.api.base_url, s.api.api_key, s.api.model, s.api.max_retries = base_url, key, model, retries
    s.api.timeout = 10
    return create_engine(s)


def test_retries_5xx_before_first_token(served):
    app = FailFirst(create_app(served, api_key="k"), n=2)
    with BackgroundServer(app) as server, api_engine(server.base_url) as eng:
        text, usage = eng.chat(MSGS, SP)
    assert text and usage.completion_tokens > 0
    assert app.chat_requests == 3


def test_gives_up_after_max_retries_with_a_clear_error(served):
    app = FailFirst(create_app(served, api_key="k"), n=100, status=502)
    with BackgroundServer(app) as server, api_engine(server.base_url, retries=2) as eng:
        with pytest.raises(BackendUnavailable, match=r"failed after 3 attempt\(s\): overloaded"):
            eng.chat(MSGS, SP)
    assert app.chat_requests == 3


def test_connection_refused_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with api_engine(url, model="m", retries=2) as eng:
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable, match=f"{url} failed after 3 attempt"):
            eng.chat(MSGS, SP)
        assert time.perf_counter() - t0 >= 0.5 + 1.0  # backoff 0.5 s, then 1 s


@pytest.mark.parametrize("status,error", [(400, InvalidRequest), (401, AuthenticationFailed),
                                          (404, ModelNotFound)])
def test_client_errors_are_not_retried(served, status, error):
    app = FailFirst(create_app(served, api_key="k"), n=100, status=status)
    with BackgroundServer(app) as server, api_engine(server.base_url, model="tiny-chat") as eng:
        with pytest.raises(error, match="overloaded"):
            eng.chat(MSGS, SP)
    assert app.chat_requests == 1


def test_real_401_404_400_from_our_server(served):
    with BackgroundServer(create_app(served, api_key="right")) as server:
        with api_engine(server.base_url, key="wrong", model="tiny-chat") as eng:
            with pytest.raises(AuthenticationFailed, match="refused the API key"):
                eng.chat(MSGS, SP)
        with api_engine(server.base_url, key="right", model="other-model") as eng:
            with pytest.raises(ModelNotFound, match="other-model"):
                eng.chat(MSGS, SP)
        with api_engine(server.base_url, key="right") as eng:
            assert eng.model_name == "tiny-chat"  # taken from /v1/models
            with pytest.raises(InvalidRequest, match="context"):
                eng.chat([{"role": "user", "content": "word " * 9000}], SP)


def test_timeout_is_a_clear_error(served):
    import asyncio

    class Slow:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
                await asyncio.sleep(3)
            await self.app(scope, receive, send)

    with BackgroundServer(Slow(create_app(served))) as server:
        s = EngineSettings(backend="api")
        s.api.base_url, s.api.model, s.api.timeout, s.api.max_retries = server.base_url, "tiny-chat", 0.5, 0
        with create_engine(s) as eng:
            with pytest.raises(BackendUnavailable, match="failed after 1 attempt"):
                eng.chat(MSGS, SP)


def test_with_the_models_tokenizer_a_request_is_fitted_and_refused_here_before_it_is_sent(tiny_model):
    """--api-tokenizer (what the app's workers use over their model server): a history longer
    than the context loses its oldest turns here, and a message that cannot fit at all is a
    ContextOverflow at prepare, with no request sent (nothing listens at that address)."""
    from infer_engine import ContextOverflow
    from infer_engine.settings import ApiSettings

    dead = f"http://127.0.0.1:{free_port()}/v1"
    engine = create_engine(EngineSettings(backend="api", session_len=256, api=ApiSettings(
        base_url=dead, model="tiny-chat", tokenizer=str(tiny_model), max_retries=0)))
    assert engine.session_len == 256
    long_turn = " ".join(["word"] * 60)
    history = []
    for i in range(8):
        history += [{"role": "user", "content": f"q{i} {long_turn}"}, {"role": "assistant", "content": long_turn}]
    gen = engine.prepare(history + [{"role": "user", "content": "last"}], SamplingParams(max_new_tokens=32))
    assert gen.messages[-1]["content"] == "last" and len(gen.messages) < len(history) + 1
    assert len(gen.prompt_ids) <= 256 - 32
    with pytest.raises(ContextOverflow):
        engine.prepare([{"role": "user", "content": " ".join(["word"] * 400)}], SamplingParams(max_new_tokens=32))
    engine.close()
