"""The chat app, driven as users drive it: a real Gradio server on 127.0.0.1 and gradio_client."""
from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError

from chat_ui.history import ERROR_TITLE, text_of
from chat_ui.settings import AppSettings
from chat_ui.ui import ChatUI, launch
from conftest import ROOT
from engines import local_settings
from infer_engine import Engine, EngineSettings, create_engine
from infer_engine.server import free_port

GREEDY = (0.0, 0.8, 40, 1.0)  # temperature, top_p, top_k, repetition_penalty


class Recorder(Engine):
    """Passes everything to a real engine and notes how each session's last stream ended."""

    def __init__(self, inner: Engine):
        self.inner, self.model_name, self.finished = inner, inner.model_name, {}

    def stream_chat(self, messages, sampling=None, session_id="default"):
        stream = self.inner.stream_chat(messages, sampling, session_id)

        def gen():
            for d in stream:
                if d.usage:
                    self.finished[session_id] = (d.usage.finish_reason, time.perf_counter())
                yield d
        return gen()

    def cancel(self, session_id):
        return self.inner.cancel(session_id)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def app(tiny_model):
    engine = Recorder(create_engine(local_settings(tiny_model)))
    base = create_engine(local_settings(tiny_model))
    settings = AppSettings(host="127.0.0.1", port=free_port(), max_input_chars=200, concurrency=16,
                           title="Test chat", model_label="fine-tuned", compare_label="base")
    demo = ChatUI(engine, settings, compare=base).build()
    launch(demo, settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/", engine
    demo.close()
    engine.close()
    base.close()


def client(url: str) -> Client:
    return Client(url, verbose=False)


def send(c: Client, message: str, max_new: int = 16, system: str = ""):
    return c.predict(message, system, max_new, *GREEDY, api_name="/send")


def turns(history) -> list[tuple[str, str]]:
    return [(m["role"], text_of(m["content"])) for m in history]


def test_chat_retry_undo_clear(app):
    c = client(app[0])
    history, _box, stats = send(c, "你好")
    assert [r for r, _ in turns(history)] == ["user", "assistant"] and turns(history)[1][1]
    assert "tokens" in stats and "first token" in stats and "tokens/s" in stats
    history, _, _ = send(c, "Hello!")
    assert [t for r, t in turns(history) if r == "user"] == ["你好", "Hello!"]
    first_reply = turns(history)[3][1]
    history, stats = c.predict("", 16, *GREEDY, api_name="/retry")
    assert len(history) == 4 and turns(history)[3][1] == first_reply  # greedy: same reply again
    history, box, _ = c.predict(api_name="/undo")
    assert box == "Hello!" and [r for r, _ in turns(history)] == ["user", "assistant"]
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
        assert [t for r, t in turns(history) if r == "user"] == [f"session {i} turn {k}" for k in range(3)]
        assert [r for r, _ in turns(history)] == ["user", "assistant"] * 3


def test_stop_cancels_the_engine_generation(app):
    url, engine = app
    c = client(url)
    job = c.submit("write a long story", "", 3000, *GREEDY, api_name="/send")
    deadline = time.time() + 20
    while time.time() < deadline:  # wait until the reply is streaming
        outs = job.outputs()
        if outs and len(outs[-1][0]) == 2 and len(text_of(outs[-1][0][1]["content"])) > 20:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the reply never started streaming")
    sid = next(s for s in engine.inner._runs._items if s.endswith(":chat"))
    t0 = time.perf_counter()
    c.predict(api_name="/stop")
    while sid not in engine.finished and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    reason, at = engine.finished[sid]
    assert reason == "cancelled"
    assert at - t0 < 1.0, f"engine stopped {at - t0:.2f}s after Stop"


def test_too_long_input_is_refused_with_a_clear_message(app):
    c = client(app[0])
    with pytest.raises(AppError, match="has 201 characters; the limit is 200"):
        send(c, "x" * 201)
    with pytest.raises(AppError, match="Value 5.0 is greater than maximum value 1"):  # top_p
        c.predict("hi", "", 16, 0.5, 5.0, 40, 1.0, api_name="/send")
    history, _, _ = send(c, "still here")  # the session goes on
    assert turns(history)[0] == ("user", "still here")


def test_compare_answers_with_both_models(app):
    c = client(app[0])
    a, b, _box, stats_a, stats_b = c.predict("你好", "", 16, *GREEDY, api_name="/compare")
    assert turns(a)[0] == turns(b)[0] == ("user", "你好")
    assert turns(a)[1][1] and turns(b)[1][1]
    assert turns(a)[1][1] == turns(b)[1][1]  # same weights here, greedy
    assert "tokens" in stats_a and "tokens" in stats_b
    a, b, *_ = c.predict("Hello!", "", 16, *GREEDY, api_name="/compare")
    assert len(a) == len(b) == 4


def test_engine_errors_show_in_the_chat_and_the_app_stays_up():
    s = EngineSettings(backend="api")
    s.api.base_url, s.api.model, s.api.max_retries = f"http://127.0.0.1:{free_port()}/v1", "m", 0
    engine = create_engine(s)
    settings = AppSettings(host="127.0.0.1", port=free_port())
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        c = client(f"http://127.0.0.1:{settings.port}/")
        for _ in range(2):
            history, _, _ = send(c, "hello")
            last = history[-1]
            assert last["metadata"]["title"] == ERROR_TITLE
            assert "failed after 1 attempt" in text_of(last["content"])
    finally:
        demo.close()


def test_app_help_documents_every_setting():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model-path", "--backend", "--host", "--port", "--title", "--system-prompt",
                 "--examples", "--concurrency", "--auth", "--compare-model-path", "--model-source",
                 "--max-input-chars", "--queue-size", "--env-file"):
        assert flag in out, flag


def test_app_refuses_a_missing_model_with_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "app.py", "--model-path", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "nope" in r.stderr


def test_queue_and_auth_settings(tiny_model):
    engine = create_engine(local_settings(tiny_model))
    settings = AppSettings(host="127.0.0.1", port=free_port(), auth="ann:secret", queue_size=3,
                           concurrency=2)
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
