"""Our OpenAI-compatible server, driven by the official openai client and raw HTTP."""
from __future__ import annotations

import http.client
import json
import time

import openai
import pytest

from engines import local_settings
from infer_engine import EngineError, create_engine
from infer_engine.server import BackgroundServer, create_app
from infer_engine.synthetic_backend import SyntheticEngine

KEY = "sk-server-test"


@pytest.fixture(scope="module")
def served(tiny_model):
    with create_engine(local_settings(tiny_model)) as engine, \
            BackgroundServer(create_app(engine, api_key=KEY)) as server:
        yield engine, server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].base_url, api_key=KEY, max_retries=0)


MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_non_streaming_and_streaming_agree(client):
    full = client.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def raw(served, body, headers=None, path="/v1/chat/completions", method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", served[1].port, timeout=10)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"null")


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, "messages"),
    # what used to be a plain-text 500
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": "x"}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": [1]}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a" * 30_000]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x\ud800"]}, "stop[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": "5"}, "top_k"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
])
def test_bad_requests_get_400_with_openai_error_body(served, body, param):
    status, payload = raw(served, body)
    assert status == 400, payload
    err = payload["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
    assert served[0].running_sessions() == []


def test_n_null_is_n_one(served):
    status, payload = raw(served, {"messages": MSGS, "n": None, "max_tokens": 2})
    assert status == 200 and len(payload["choices"]) == 1


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_bodies_get_413_and_are_never_held(served, chunked):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (20 * 2**20)}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", served[1].port, timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if chunked:
        conn.request("POST", "/v1/chat/completions", headers=headers, encode_chunked=True,
                     body=(body[i:i + 2**16] for i in range(0, len(body), 2**16)))
    else:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    assert resp.status == 413 and payload["error"]["message"] == "request body too large: the limit is 2 MB"
    status, _ = raw(served, {"messages": MSGS, "max_tokens": 2})  # and the server goes on
    assert status == 200


def test_official_client_sees_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be"):
        client.chat.completions.create(model="tiny-chat", messages=MSGS, temperature=3)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=MSGS)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", KEY])
def test_api_key_is_required(served, auth):
    headers = {"Authorization": auth} if auth else {"Authorization": ""}
    status, payload = raw(served, None, headers, path="/v1/models", method="GET")
    assert status == 401 and payload["error"]["type"] == "authentication_error"


def _wait_until_idle(engine, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not engine.running_sessions():
            return True
        time.sleep(0.02)
    return False


class FailingEngine(SyntheticEngine):
    """Fails after two words, as a backend whose generation breaks (out of memory, ...)."""

    def generate(self, gen):
        for i, piece in enumerate(super().generate(gen)):
            if i == 3:
                raise EngineError("generation failed: CUDA error: an illegal memory access")
            yield piece


def test_a_failing_stream_sends_an_error_event_then_done():
    with FailingEngine() as engine, BackgroundServer(create_app(engine)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": [{"role": "user", "content": "one two three"}], "stream": True}),
            headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        events = [ln for ln in resp.read().decode().splitlines() if ln.startswith("data: ")]
        assert resp.status == 200
        assert json.loads(events[-2][6:])["error"]["message"].startswith("generation failed")
        assert events[-1] == "data: [DONE]"
        assert engine.running_sessions() == []


def test_each_request_is_one_log_line(served):
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        raw(served, {"messages": MSGS, "max_tokens": 3, "ignore_eos": True, "temperature": 0})
        raw(served, {"messages": MSGS, "temperature": 9})
    finally:
        logger.remove(sink)
    ok, bad = [ln for ln in lines if "/v1/chat/completions" in ln]
    assert " 200 " in ok and "completion_tokens=3" in ok and "finish=length" in ok and "ttft=" in ok
    assert " 400 " in bad and "temperature must be" in bad


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(served, stream):
    engine, server = served
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    else:
        deadline = time.time() + 5
        while not engine.running_sessions() and time.time() < deadline:
            time.sleep(0.01)
    assert engine.running_sessions(), "generation should be running"
    conn.sock.close()  # hang up mid-generation (3000 tokens take several seconds here)
    conn.close()
    assert _wait_until_idle(engine, 1.5), "generation still running after the client left"


def test_a_stream_interval_sends_fewer_chunks_with_the_same_text_and_usage():
    """--stream-interval-ms (what the app's workers' model server uses): what comes between two
    chunks goes in one; the first chunk is not held back and nothing is lost."""
    from infer_engine.settings import EngineSettings, SyntheticSettings

    engine = SyntheticEngine(EngineSettings(backend="synthetic", synthetic=SyntheticSettings(
        tokens_per_s=200, reply_tokens=40)))
    texts, counts = {}, {}
    for interval in (0.0, 100.0):
        with BackgroundServer(create_app(engine, stream_interval_ms=interval)) as server:
            c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
            t0 = time.perf_counter()
            chunks = list(c.chat.completions.create(model="synthetic", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=64, stream=True, stream_options={"include_usage": True}))
            elapsed = time.perf_counter() - t0
            content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
            texts[interval], counts[interval] = "".join(content), len(content)
            assert chunks[-1].usage.completion_tokens == 40
    assert texts[0.0] == texts[100.0] and texts[0.0].startswith("You said: hi")
    assert counts[100.0] <= elapsed / 0.1 + 2 < 40
    engine.close()
