"""The chat app, driven as users drive it: a real Gradio server on 127.0.0.1, gradio_client and
plain HTTP. UI behaviour runs over the synthetic engine (fixed replies at a fixed pace, honours
cancel), so nothing here depends on what a random model samples."""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError

from chat_ui.history import ERROR_MARK, text_of
from chat_ui.settings import AppSettings
from chat_ui.ui import BUSY, ChatUI, launch
from conftest import ROOT
from engines import Recorder, synthetic
from infer_engine import EngineSettings, create_engine
from infer_engine.server import free_port

GREEDY = (0.0, 0.8, 40, 1.0)  # temperature, top_p, top_k, repetition_penalty


def app_settings(tmp_path_factory, **kw) -> AppSettings:
    """Settings for a test app: on 127.0.0.1, a free port, its own chat store."""
    return AppSettings(host="127.0.0.1", port=free_port(),
                       history_path=str(tmp_path_factory.mktemp("chats") / "chats.sqlite3"), **kw)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    engine = Recorder(synthetic(tokens_per_s=400, name="fine-tuned"))
    base = synthetic(tokens_per_s=400, name="base")
    settings = app_settings(tmp_path_factory, max_input_chars=200, concurrency=16,
                            title="Test chat", model_label="fine-tuned", compare_label="base")
    demo = ChatUI(engine, settings, compare=base).build()
    launch(demo, settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/", engine, settings.port
    demo.close()
    engine.close()
    base.close()


def client(url: str) -> Client:
    return Client(url, verbose=False)


def send(c: Client, message: str, max_new: int = 16, system: str = ""):
    return c.predict(message, system, max_new, *GREEDY, api_name="/send")


def turns(history) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m["content"])) for m in history]


def wait_streaming(job, min_chars: int = 20, seconds: float = 30):
    deadline = time.time() + seconds
    while time.time() < deadline:  # observable state: the reply is on screen and growing
        outs = job.outputs()
        if outs and len(outs[-1][0]) >= 2 and len(text_of(outs[-1][0][-1]["content"])) > min_chars:
            return outs[-1]
        time.sleep(0.02)
    pytest.fail("the reply never started streaming")


def test_chat_retry_undo_clear(app):
    c = client(app[0])
    history, _box, stats = send(c, "你好")
    assert turns(history) == [("user", "你好"), ("assistant", "You said: 你好")]
    assert "tokens" in stats and "first token" in stats and "tokens/s" in stats
    history, _, _ = send(c, "Hello!")
    assert [t for r, t in turns(history) if r == "user"] == ["你好", "Hello!"]
    history, stats = c.predict("", 16, *GREEDY, api_name="/retry")
    assert turns(history)[2:] == [("user", "Hello!"), ("assistant", "You said: Hello!")]
    history, box, _ = c.predict(api_name="/undo")
    assert box == "Hello!" and turns(history) == [("user", "你好"), ("assistant", "You said: 你好")]
    history, box, stats = c.predict(api_name="/clear")
    assert history == [] and box == "" and stats == ""
    history, _, _ = send(c, "again")  # the server-side history really was cleared
    assert [t for r, t in turns(history) if r == "user"] == ["again"]


def test_sixteen_concurrent_sessions_see_only_their_own_turns(app):
    def chat(i: int):
        c = client(app[0])
        history = None
        for turn in range(3):
            history, _, _ = send(c, f"session {i} turn {turn}", max_new=8)
        return history

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(chat, range(16)))
    for i, history in enumerate(results):
        assert turns(history) == [x for k in range(3) for x in (
            ("user", f"session {i} turn {k}"), ("assistant", f"You said: session {i} turn {k}"))]


def test_stop_cancels_the_engine_generation(app):
    url, engine, _ = app
    c = client(url)
    engine.inner.settings.reply_tokens = 3000
    try:
        job = c.submit("write a long story", "", 3000, *GREEDY, api_name="/send")
        wait_streaming(job)
        (sid,) = engine.running_sessions()
        c.predict(api_name="/stop")
        assert engine.wait_session_free(sid, timeout=10), "the engine kept the session after Stop"
        reason, tokens = engine.finished[sid]
        assert reason == "cancelled" and tokens < 3000
    finally:
        engine.inner.settings.reply_tokens = 0
    history, _, _ = send(c, "next question")  # the chat goes on at once
    assert turns(history)[-1] == ("assistant", "You said: next question")


def test_too_long_input_is_refused_with_a_clear_message(app):
    c = client(app[0])
    with pytest.raises(AppError, match="message has 201 characters; the limit is 200"):
        send(c, "x" * 201)
    with pytest.raises(AppError, match="system prompt has 5,000 characters; the limit is 200"):
        send(c, "hi", system="s" * 5000)
    with pytest.raises(AppError, match=r"Invalid setting: top_p must be a number in \(0, 1\], got 5.0"):
        c.predict("hi", "", 16, 0.5, 5.0, 40, 1.0, api_name="/send")
    history, _, _ = send(c, "still here")  # the session goes on
    assert turns(history) == [("user", "still here"), ("assistant", "You said: still here")]


def post(port: int, path: str, body: bytes, headers: dict | None = None, chunked: bool = False
         ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if chunked:  # no Content-Length: the size shows only while reading
        conn.request("POST", path, body=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                     headers=headers, encode_chunked=True)
    else:
        conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_request_bodies_over_one_megabyte_are_refused(app):
    port = app[2]
    for size in (2 * 2**20, 20 * 2**20):
        body = json.dumps({"data": ["hi", "s" * size, 16, *GREEDY]}).encode()
        status, payload = post(port, "/gradio_api/call/send", body)
        assert status == 413 and b"request body too large: the limit is 1 MB" in payload
        assert post(port, "/gradio_api/call/send", body, chunked=True)[0] == 413
    small = json.dumps({"data": ["hi", "", 16, *GREEDY]}).encode()
    status, payload = post(port, "/gradio_api/call/send", small, chunked=True)
    assert status == 200 and "event_id" in json.loads(payload)


def test_uploads_are_refused_and_nothing_is_stored(app):
    port = app[2]
    upload_dir = Path(os.environ.get("GRADIO_TEMP_DIR", Path(tempfile.gettempdir()) / "gradio"))
    before = sorted(upload_dir.rglob("*")) if upload_dir.exists() else []
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.svg\"\r\n"
            f"Content-Type: image/svg+xml\r\n\r\n<svg onload=alert(1)></svg>\r\n--{boundary}--\r\n").encode()
    for path in ("/gradio_api/upload", "/gradio_api/upload/", "/upload"):
        status, payload = post(port, path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 403 and b"takes no uploads" in payload, path
    after = sorted(upload_dir.rglob("*")) if upload_dir.exists() else []
    assert after == before


def call(port: int, api: str, data: list, session_hash: str) -> tuple[str, object]:
    """Gradio's documented REST API, as a plain HTTP client: POST /gradio_api/call/<api>, then
    read its SSE stream; returns the last event and its data."""
    raw = json.dumps({"data": data, "session_hash": session_hash}).encode()  # \ud800 stays an escape
    status, payload = post(port, f"/gradio_api/call/{api}", raw)
    assert status == 200, payload
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/gradio_api/call/{api}/{json.loads(payload)['event_id']}")
    event, last = None, None
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            last = (event, json.loads(line[6:]))
    return last


def test_a_lone_surrogate_is_refused_and_the_session_goes_on(app):
    port, session = app[2], "surrogate-session"
    for message, system in (("a\ud800b", ""), ("hi", "x\udfffy")):
        event, data = call(port, "send", [message, system, 16, *GREEDY], session)
        assert event == "error" and "not valid text" in json.dumps(data)
    event, data = call(port, "send", ["hello", "", 16, *GREEDY], session)
    assert event == "complete"
    assert turns(data[0]) == [("user", "hello"), ("assistant", "You said: hello")]


def test_a_second_send_while_one_streams_is_refused_and_nothing_is_lost(app):
    url, engine, _ = app
    c = client(url)
    engine.inner.settings.reply_tokens = 400  # one second at 400 tokens/s
    try:
        job = c.submit("first", "", 400, *GREEDY, api_name="/send")
        wait_streaming(job)
        with pytest.raises(AppError) as err:
            send(c, "second")
        assert str(err.value).strip() == BUSY
        assert c.session_hash not in str(err.value) and "session" not in str(err.value)
        history = job.result()[0]
    finally:
        engine.inner.settings.reply_tokens = 0
    assert turns(history)[0] == ("user", "first") and len(history) == 2
    history, _, _ = send(c, "third")
    assert [t for r, t in turns(history) if r == "user"] == ["first", "third"]


def test_compare_answers_with_both_models(app):
    c = client(app[0])
    a, b, _box, stats_a, stats_b = c.predict("你好", "", 16, *GREEDY, api_name="/compare")
    assert turns(a) == turns(b) == [("user", "你好"), ("assistant", "You said: 你好")]
    assert "tokens" in stats_a and "tokens" in stats_b
    a, b, *_ = c.predict("Hello!", "", 16, *GREEDY, api_name="/compare")
    assert len(a) == len(b) == 4


def test_compare_clear_leaves_the_chat_tab_alone(app):
    url, engine, _ = app
    c = client(url)
    engine.inner.settings.reply_tokens = 400
    try:
        job = c.submit("keep going", "", 400, *GREEDY, api_name="/send")
        wait_streaming(job)
        (sid,) = engine.running_sessions()
        c.predict(api_name="/clear_compare")
        history = job.result()[0]
    finally:
        engine.inner.settings.reply_tokens = 0
    assert engine.finished[sid][1] == 400 and engine.finished[sid][0] != "cancelled"
    assert len(text_of(history[-1]["content"]).split()) == 400


@pytest.fixture
def loguru_lines():
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    yield lines
    logger.remove(sink)


def test_backend_errors_are_readable_without_internal_urls(loguru_lines, tmp_path_factory):
    port = free_port()
    s = EngineSettings(backend="api")
    s.api.base_url, s.api.model, s.api.max_retries = f"http://127.0.0.1:{port}/v1", "m", 0
    engine = create_engine(s)
    settings = app_settings(tmp_path_factory)
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        c = client(f"http://127.0.0.1:{settings.port}/")
        for _ in range(2):
            history, _, _ = send(c, "hello")
            shown = text_of(history[-1]["content"])
            assert shown.startswith(ERROR_MARK)
            assert "not reachable" in shown and "127.0.0.1" not in shown and str(port) not in shown
    finally:
        demo.close()
    logged = [ln for ln in loguru_lines if "chat session=" in ln]
    assert len(logged) == 2 and all(f"127.0.0.1:{port}" in ln and "BackendUnavailable" in ln for ln in logged)


def test_each_reply_is_one_log_line(app, loguru_lines):
    c = client(app[0])
    send(c, "log me")
    line = next(ln for ln in loguru_lines if "chat session=" in ln)
    for part in ("prompt_tokens=2", "completion_tokens=4", "ttft=", "finish=stop", "status=ok"):
        assert part in line, line
    assert "log me" not in line  # what people type stays out of the log


def test_the_context_limit_is_checked_before_the_message_joins_the_chat(tiny_model, tmp_path_factory):
    from engines import local_settings

    engine = create_engine(local_settings(tiny_model, session_len=256))
    settings = app_settings(tmp_path_factory, max_input_chars=4000)
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        c = client(f"http://127.0.0.1:{settings.port}/")
        history, box, stats = send(c, "word " * 300, max_new=64)
        assert box == ("word " * 300).strip()  # back in the box, to shorten
        assert len(history) == 1 and text_of(history[0]["content"]).startswith(ERROR_MARK)
        assert "shorten it or lower Max new tokens" in text_of(history[0]["content"])
        history, _, _ = send(c, "hi", max_new=8)  # the refused message is not part of the chat
        assert [t for r, t in turns(history) if r == "user"] == ["hi"]
    finally:
        demo.close()
        engine.close()


def test_analytics_are_off():
    # a public deployment must not call out: Gradio's default is on
    assert ChatUI(synthetic(), AppSettings(no_history=True)).build().analytics_enabled is False


def test_app_help_documents_every_setting():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model-path", "--backend", "--host", "--port", "--title", "--system-prompt",
                 "--examples", "--concurrency", "--auth", "--compare-model-path", "--model-source",
                 "--max-input-chars", "--queue-size", "--env-file", "--compare-api-base-url"):
        assert flag in out, flag


def test_app_refuses_a_missing_model_with_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "app.py", "--model-path", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "nope" in r.stderr


def test_a_chat_store_that_cannot_be_opened_is_one_clear_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    r = subprocess.run([sys.executable, "app.py", "--backend", "synthetic", "--history-path",
                        str(tmp_path / "a-file" / "chats.sqlite3")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'a-file' / 'chats.sqlite3'}: "
                                                         "cannot be used as the chat store")


def test_api_compare_with_the_same_remote_model_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--backend", "api", "--api-model", "m",
                        "--compare-model-path", "m"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert "is the model the app already serves" in r.stderr.strip().splitlines()[-1]


def test_queue_and_auth_settings(tmp_path_factory):
    engine = synthetic()
    settings = app_settings(tmp_path_factory, auth="ann:secret", queue_size=3, concurrency=2)
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        assert demo._queue.max_size == 3 and demo.max_file_size == 1024 * 1024
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(f"http://127.0.0.1:{settings.port}/", verbose=False)  # no credentials
        c = Client(f"http://127.0.0.1:{settings.port}/", auth=("ann", "secret"), verbose=False)
        history, _, _ = send(c, "hi")
        assert len(history) == 2
    finally:
        demo.close()
        engine.close()

