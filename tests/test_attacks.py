"""Issue 22's findings, each as a test: lost writes across app processes, a full disk, unbounded
disk use by one visitor, bearer ids readable by page scripts, uploads, exports, one API client
holding everyone, connection floods, the launcher's exposure, and the training data tools'
memory. Counts and bytes are asserted, never wall time."""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import sqlite3
import time

import pytest

from chat_ui.conversation import Conversations, Limits
from chat_ui.replies import Refusal
from chat_ui.settings import AppSettings
from chat_ui.store import ChatTooLarge, SQLiteStore, StoreWriteError, new_browser_id, new_chat
from engines import synthetic


def _appender(path: str, browser: str, chat_id: str, n: int, tag: str) -> None:
    store = SQLiteStore(path)
    for i in range(n):
        store.update(browser, chat_id, lambda c, i=i: c.messages.append({"role": "user", "content": f"{tag}{i}"}))
    store.close()


# 1. no lost writes across app processes

def test_two_processes_updating_one_chat_lose_nothing(tmp_path):
    path, browser = str(tmp_path / "chats.sqlite3"), new_browser_id()
    store = SQLiteStore(path)
    chat = new_chat()
    store.save(browser, chat)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_appender, args=(path, browser, chat.id, 300, tag)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    kept = store.get(browser, chat.id).messages
    store.close()
    assert len(kept) == 600  # every update of both processes (520 of 1,000 were kept before)
    assert {m["content"] for m in kept} == {f"{t}{i}" for t in "ab" for i in range(300)}


def service(tmp_path, engine, **kw) -> Conversations:
    settings = AppSettings(history_path=str(tmp_path / "chats.sqlite3"), **kw)
    store = SQLiteStore(settings.history_path, max_bytes_per_browser=int(settings.history_max_mb * 2**20))
    return Conversations(engine, store, settings, Limits.of(settings, [engine]), "test")


async def _reply_done(svc: Conversations, ptr: dict) -> None:
    while svc.running(ptr) is not None or svc.busy():
        await asyncio.sleep(0.01)


def test_a_rating_given_while_a_reply_streams_is_kept(tmp_path):
    engine = synthetic(tokens_per_s=200, reply_tokens=100)
    svc = service(tmp_path, engine)

    async def run():
        ptr, chat = svc.session(None)
        await svc.send(ptr, chat, "first", svc.form("", 200, 0, 0.8, 40, 1.0))
        await _reply_done(svc, ptr)
        ptr, chat = svc.session(ptr)
        live = await svc.send(ptr, chat, "second", svc.form("", 200, 0, 0.8, 40, 1.0))
        while len(live.text.split()) < 10:  # it streams; the visitor rates the first reply now
            await asyncio.sleep(0.01)
        svc.like(ptr, 1, "dislike")
        await _reply_done(svc, ptr)
        return svc.store.get(ptr["browser"], ptr["chat"])

    chat = asyncio.run(run())
    engine.close()
    assert chat.messages[1].get("feedback") == "dislike"  # lost 5 of 5 before
    assert chat.messages[-1]["content"].startswith("You said: second")


# 2. a full disk: said in words, and the chat is not locked for good

def test_a_full_disk_is_said_in_words_and_releases_the_chat(tmp_path, monkeypatch):
    engine = synthetic(tokens_per_s=0)
    svc = service(tmp_path, engine)
    real_put = SQLiteStore._put
    full = {"on": True}

    def put(self, browser, chat, data):
        if full["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return real_put(self, browser, chat, data)

    ptr, chat = svc.session(None)
    monkeypatch.setattr(SQLiteStore, "_put", put)

    async def send(text: str):
        live = await svc.send(ptr, svc.session(ptr)[1], text, svc.form("", 32, 0, 0.8, 40, 1.0))
        await _reply_done(svc, ptr)
        return live

    with pytest.raises(StoreWriteError, match="the server's disk is full") as err:
        asyncio.run(send("while the disk is full"))
    assert isinstance(err.value, Refusal)  # the page shows it as any refusal, in words
    full["on"] = False  # space is back
    asyncio.run(send("after"))  # not "A reply is still being written in this chat"
    assert [m["content"] for m in svc.store.get(ptr["browser"], ptr["chat"]).messages][0] == "after"
    engine.close()


def test_retention_runs_while_the_app_runs_not_only_at_start(tmp_path, monkeypatch):
    import chat_ui.store as store_mod

    store = SQLiteStore(tmp_path / "c.sqlite3", retention_days=1)
    b = new_browser_id()
    old = new_chat(messages=[{"role": "user", "content": "old"}])
    store.save(b, old)
    store._db.execute("UPDATE chats SET updated = ? WHERE id = ?", (time.time() - 3 * 86400, old.id))
    monkeypatch.setattr(store_mod, "EXPIRE_EVERY_S", 0.0)
    store.save(b, new_chat(messages=[{"role": "user", "content": "new"}]))  # a save runs retention
    assert store.get(b, old.id) is None
    store.close()


# 3. one visitor cannot fill the disk

def test_a_chat_over_the_limit_is_refused_and_the_store_has_a_total_cap(tmp_path):
    store = SQLiteStore(tmp_path / "c.sqlite3", max_bytes_per_browser=10_000, max_total_bytes=400_000)
    b = new_browser_id()
    with pytest.raises(ChatTooLarge, match="over the limit"):  # one chat alone over a browser's share
        store.save(b, new_chat(messages=[{"role": "user", "content": "x" * 20_000}]))
    assert store.chats(b) == []
    browsers = [new_browser_id() for _ in range(100)]  # 100 browsers x ~9 KB each: more than the total
    for br in browsers:
        store.save(br, new_chat(messages=[{"role": "user", "content": "y" * 9_000}]))
    assert store._total() <= 400_000 + 64 * 1024  # within the cap (a page's worth of slack)
    assert store.chats(browsers[-1])  # the newest visitor's chat is kept; the oldest went
    assert not store.chats(browsers[0])
    store.close()


def test_titles_are_bounded_on_import_and_rename(tmp_path):
    from chat_ui.store import chat_from_json

    chat = chat_from_json(json.dumps({"title": "t" * 500_000, "messages": [{"role": "user", "content": "q"}]}))
    assert len(chat.title) <= 80


# 3 and 4: uploads checked, counted and bound to their visitor; exports served once to their
# browser; the browser id in an HttpOnly cookie, no secret in the page's config

import http.client  # noqa: E402
import io  # noqa: E402

from PIL import Image  # noqa: E402

from chat_ui.ui import ChatUI, launch  # noqa: E402
from chat_ui.visitors import BROWSER_COOKIE, Downloads, Uploads, sweep_cache  # noqa: E402
from test_app import GREEDY, app_settings  # noqa: E402
from test_app_images import image_engine  # noqa: E402


@pytest.fixture(scope="module")
def image_app(tmp_path_factory):
    engine = image_engine()
    settings = app_settings(tmp_path_factory, max_image_mb=1, upload_mb_per_10min=3)
    ui = ChatUI(engine, settings)
    demo = ui.build()
    launch(demo, settings, prevent_thread_lock=True)
    yield ui, settings.port
    demo.close()
    engine.close()


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body or None, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def png(size=(16, 16), noise: bool = False) -> bytes:
    out = io.BytesIO()
    image = Image.frombytes("RGB", size, __import__("os").urandom(size[0] * size[1] * 3)) if noise else \
        Image.new("RGB", size, (200, 30, 30))
    image.save(out, "PNG")
    return out.getvalue()


def upload(port: int, name: str, raw: bytes, cookie: str = ""):
    boundary = "----attack"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    return request(port, "POST", "/gradio_api/upload", body,
                   {"Content-Type": f"multipart/form-data; boundary={boundary}", **({"Cookie": cookie} if cookie else {})})


def browser_cookie(port: int) -> str:
    status, headers, _ = request(port, "GET", "/", headers={"Accept": "text/html"})
    value = headers.get("set-cookie", "")
    assert status == 200 and value.startswith(f"{BROWSER_COOKIE}=") and "HttpOnly" in value and "SameSite=Lax" in value
    return value.split(";")[0]


def test_the_browser_id_is_an_httponly_cookie_and_the_config_holds_no_secret(image_app):
    ui, port = image_app
    browser_cookie(port)
    _, _, config = request(port, "GET", "/config")
    assert b"secret" not in config and b"BrowserState" not in config and b"chat-app-browser" not in config


def test_uploads_are_checked_on_arrival_counted_and_bound_to_their_visitor(image_app):
    ui, port = image_app
    alice, mallory = browser_cookie(port), browser_cookie(port)
    status, _, body = upload(port, "noise.png", bytes(range(256)) * 3000, alice)
    assert status == 400 and b"not a readable image" in body  # noise named .png: refused before it is kept
    status, _, body = upload(port, "red.png", png(), alice)
    assert status == 200
    path = json.loads(body)[0]
    ask = json.dumps({"data": [{"text": "whose image?", "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]},
                               None, "", 8, *GREEDY]}).encode()
    status, _, body = request(port, "POST", "/gradio_api/call/send", ask, {"Content-Type": "application/json",
                                                                          "Cookie": mallory})
    event = json.loads(body)["event_id"]
    _, _, stream = request(port, "GET", f"/gradio_api/call/send/{event}", headers={"Cookie": mallory})
    assert b"not uploaded from this browser" in stream  # a cache path of someone else's image is refused
    big = png((540, 540), noise=True)  # ~0.9 MB of quota each: the 3 MB share runs out
    assert 0.8 * 2**20 < len(big) < 2**20
    answers = [upload(port, f"b{i}.png", big, alice)[0] for i in range(6)]
    assert 429 in answers and answers[0] == 200
    assert upload(port, "other.png", png(), mallory)[0] == 200  # another visitor's share is its own


def test_an_export_is_served_once_to_its_own_browser_and_nothing_stays_on_disk():
    d = Downloads(ttl_s=60, max_bytes=100)
    token = d.add("alice", "chat.jsonl", b"{}")
    assert d.take(token, "mallory") is None  # the link alone opens nothing
    assert d.take(token, "alice") == ("chat.jsonl", b"{}")
    assert d.take(token, "alice") is None  # once
    tokens = [d.add("alice", f"{i}", b"x" * 40) for i in range(5)]
    assert d.take(tokens[0], "alice") is None and d.take(tokens[-1], "alice")  # bounded: the oldest went


def test_the_cache_sweep_removes_old_files_whatever_lands_meanwhile(tmp_path):
    import os

    old, new = tmp_path / "a" / "old.png", tmp_path / "b" / "new.png"
    for p in (old, new):
        p.parent.mkdir()
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    sweep_cache(tmp_path, max_age_s=3600, every_s=0.05)
    deadline = time.time() + 30
    while old.exists() and time.time() < deadline:
        (tmp_path / "b" / f"{time.time()}.png").write_bytes(b"y")  # uploads landing during the sweep
        time.sleep(0.01)
    assert not old.exists() and new.exists()


def test_upload_quota_counts_files_and_bytes():
    u = Uploads(bytes_per_window=100, files_per_window=3, window_s=60)
    assert u.admit("a", 1, 40) == "" and u.admit("a", 1, 40) == ""
    assert "Too many uploads" in u.admit("a", 1, 40)  # 120 bytes > 100
    assert u.admit("b", 1, 40) == ""


@pytest.mark.slow
def test_page_scripts_cannot_read_the_browser_id(browser, image_app):
    from conftest import open_page

    _, port = image_app
    ctx = browser.new_context()
    page = ctx.new_page()
    open_page(page, f"http://127.0.0.1:{port}/")
    (cookie,) = [c for c in ctx.cookies() if c["name"] == BROWSER_COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert cookie["value"] not in page.evaluate("() => document.cookie")
    stored = page.evaluate("() => JSON.stringify(Object.assign({}, localStorage))")
    assert cookie["value"] not in stored and "chat-app-browser" not in stored
    ctx.close()


# 5. one API client cannot hold everyone

import socket  # noqa: E402
import threading  # noqa: E402


from infer_engine import InvalidRequest as _InvalidRequest  # noqa: E402
from infer_engine import SamplingParams  # noqa: E402
from infer_engine.server import BackgroundServer, create_app  # noqa: E402
from infer_engine.synthetic_backend import SyntheticEngine  # noqa: E402
from infer_engine.settings import EngineSettings, SyntheticSettings  # noqa: E402


def small_engine(tokens_per_s: float, slots: int = 4) -> SyntheticEngine:
    e = SyntheticEngine(EngineSettings(backend="synthetic", synthetic=SyntheticSettings(tokens_per_s=tokens_per_s)))
    e.max_concurrency = slots  # an engine that runs this many at once (a CPU transformers batch: 8)
    return e


def chat_request(port: int, source: str, body: dict) -> tuple[int, dict]:
    """A POST from a given loopback address (another client), read whole."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(source, 0))
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def test_what_one_request_may_ask_for_is_bounded():
    engine = small_engine(0, slots=8)
    with BackgroundServer(create_app(engine, max_request_tokens=10_000)) as server:
        msgs = [{"role": "user", "content": "hi"}]
        status, body = chat_request(server.port, "127.0.0.1", {"messages": msgs, "n": 16, "max_tokens": 10})
        assert status == 400 and body["error"]["param"] == "n"  # n 16 x 4000 tokens held another client 51-74 s
        status, body = chat_request(server.port, "127.0.0.1", {"messages": msgs, "n": 4, "max_tokens": 4000})
        assert status == 400 and "n x max_tokens" in body["error"]["message"]
    engine.close()


def test_one_clients_many_generations_leave_a_turn_for_another_client():
    engine = small_engine(tokens_per_s=20, slots=4)  # client A may hold 3 of the 4 turns
    app = create_app(engine)
    with BackgroundServer(app) as server:
        finished: list[str] = []

        def a(i: int) -> None:
            chat_request(server.port, "127.0.0.1", {"messages": [{"role": "user", "content": f"a{i}"}],
                                                    "max_tokens": 40, "ignore_eos": True})
            finished.append(f"a{i}")

        hogs = [threading.Thread(target=a, args=(i,)) for i in range(6)]
        for t in hogs:
            t.start()
        deadline = time.time() + 30
        while app.state.server.fair_turns().running.get("127.0.0.1", 0) < 3 and time.time() < deadline:
            time.sleep(0.01)
        status, body = chat_request(server.port, "127.0.0.2", {"messages": [{"role": "user", "content": "b"}],
                                                               "max_tokens": 4, "ignore_eos": True})
        b_done = list(finished)
        for t in hogs:
            t.join()
    engine.close()
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert len(b_done) <= 3  # B was answered before A's later generations: it did not wait for all six


def test_schemas_that_cost_much_to_compile_are_refused_at_once():
    nested: dict = {"type": "string"}
    for _ in range(450):
        nested = {"type": "array", "items": nested}
    for schema, words in ((nested, "nests 451 levels"), ({"enum": list(range(100_000))}, "more than the 16,384"),
                          ({"enum": list(range(2000))}, "2,000 enum/const values")):
        with pytest.raises(_InvalidRequest, match=words):
            SamplingParams(response_format={"type": "json_schema", "json_schema": {"schema": schema}}).validate()
    with pytest.raises(_InvalidRequest, match="ignore_eos cannot be used with response_format"):
        SamplingParams(response_format={"type": "json_object"}, ignore_eos=True).validate()  # was a 500


def test_a_schema_error_names_no_server_path(tiny_model):
    """A regex back-reference: xgrammar's error carried its C++ source path to the client."""
    from engines import local_settings
    from infer_engine import create_engine

    fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": r"(a)\1"}}}
    with create_engine(local_settings(tiny_model)) as engine:
        with pytest.raises(_InvalidRequest) as err:
            engine.chat([{"role": "user", "content": "x"}], SamplingParams(max_new_tokens=4, response_format=fmt))
    assert "cannot be used" in err.value.message
    assert ".cc" not in err.value.message and ".h:" not in err.value.message and "site-packages" not in err.value.message


def test_waiting_requests_hold_no_thread():
    engine = small_engine(tokens_per_s=50, slots=4)
    with BackgroundServer(create_app(engine)) as server:
        before = threading.active_count()
        peak = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], threading.active_count())
                time.sleep(0.005)
        watcher = threading.Thread(target=watch)
        watcher.start()
        clients = [threading.Thread(target=chat_request, args=(server.port, f"127.0.0.{2 + i % 50}",
                                                               {"messages": [{"role": "user", "content": "x"}],
                                                                "max_tokens": 5, "ignore_eos": True}))
                   for i in range(100)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        stop.set()
        watcher.join()
    engine.close()
    # 100 client threads of this test, the watcher, and at most the engine's 4 turns of stream threads
    assert peak[0] - before <= 100 + 1 + 4 + 4, peak[0] - before


# 6. connections: slow heads and many idle connections do not shut normal clients out

def test_a_flood_of_slow_connections_leaves_normal_clients_served(tmp_path):
    import resource
    import subprocess
    import sys

    from conftest import ROOT
    from infer_engine.server import free_port

    port = free_port()

    def low_limit() -> None:  # the usual 1,024 open files
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    proc = subprocess.Popen([sys.executable, "-m", "infer_engine.server", "--backend", "synthetic", "--host",
                             "0.0.0.0", "--port", str(port), "--synthetic-tokens-per-s", "0"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=low_limit,
                            env={**__import__("os").environ, "CHAT_HEAD_TIMEOUT_S": "3"})
    slow: list[socket.socket] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        for _ in range(1100):  # a head never finished, from one address
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
            except OSError:
                break
        ok = 0
        for i in range(10):  # another client, on another loopback address
            status, _ = chat_request(port, "127.0.0.2", {"messages": [{"role": "user", "content": f"hi {i}"}],
                                                         "max_tokens": 4})
            ok += status == 200
        assert ok == 10  # 0 of 10 before
        s = slow[0]
        s.settimeout(30)
        assert s.recv(1024) == b""  # the slow head was closed by the server (its time ran out)
    finally:
        for s in slow:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)


# 9. request framing: odd Transfer-Encoding spellings are refused, as the others are

@pytest.mark.parametrize("value", ["CHUNKED", " chunked", "chunked, chunked"])
def test_odd_transfer_encodings_are_refused(value):
    engine = small_engine(0)
    with BackgroundServer(create_app(engine)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Transfer-Encoding:{value}\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n".encode())
            answer = s.recv(4096)
    engine.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_a_seeded_request_does_not_hold_up_the_others(tiny_model):
    """A seeded request (its own generator) used to pause the batch: a probe waited 13 s."""
    from engines import local_settings
    from infer_engine import create_engine

    with create_engine(local_settings(tiny_model)) as engine:
        state = {}

        def seeded() -> None:
            engine.chat([{"role": "user", "content": "hi"}],
                        SamplingParams(max_new_tokens=3000, temperature=0.8, seed=3, ignore_eos=True), "seeded")
            state["done"] = True

        t = threading.Thread(target=seeded)
        t.start()
        while not engine.running_sessions():
            time.sleep(0.01)
        engine.chat([{"role": "user", "content": "probe"}], SamplingParams(max_new_tokens=8, temperature=0), "probe")
        probe_first = "done" not in state
        t.join()
    assert probe_first  # the probe was answered while the seeded request still ran
