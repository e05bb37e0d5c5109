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
