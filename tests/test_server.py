"""Our OpenAI-compatible server, driven by the official openai client and raw HTTP."""
from __future__ import annotations

import http.client
import json
import time

import openai
import pytest

from infer_engine.server import BackgroundServer
from engines import local_settings
from infer_engine import create_engine
from infer_engine.server import create_app

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
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, "messages"),
])
def test_bad_requests_get_400_with_openai_error_body(served, body, param):
    status, payload = raw(served, body)
    assert status == 400
    err = payload["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


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
        if not engine._runs:
            return True
        time.sleep(0.02)
    return False


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
        while not engine._runs and time.time() < deadline:
            time.sleep(0.01)
    assert engine._runs, "generation should be running"
    conn.sock.close()  # hang up mid-generation (3000 tokens take several seconds here)
    conn.close()
    assert _wait_until_idle(engine, 1.5), "generation still running after the client left"
