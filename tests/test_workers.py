"""The app as several processes on one port (`--workers 2`): the supervisor, the model server
(the synthetic engine in a process of its own) and two workers behind the router, driven by
Chromium, gradio_client and plain HTTP; a worker killed and started again; Ctrl-C stopping all;
start-up failures said in one line."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from chat_ui.router import COOKIE
from conftest import ROOT, open_page
from infer_engine.server import free_port

GREEDY = (0.0, 0.8, 40, 1.0)


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return out


def env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone (or a zombie)
        return {}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def answers(port: int, path: str = "/", cookie: str = "") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept": "text/html", **({"Cookie": cookie} if cookie else {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def wait_until(check, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Supervised:
    def __init__(self, tmp_path: Path, *extra: str):
        self.port = free_port()
        self.log = tmp_path / "app.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--workers", "2", "--backend", "synthetic", "--host", "127.0.0.1",
             "--port", str(self.port), "--history-path", str(tmp_path / "chats.sqlite3"),
             "--synthetic-tokens-per-s", "60", "--synthetic-reply-tokens", "60", *extra],
            cwd=ROOT, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.proc.poll() is not None or answers(self.port) == 200, "the app")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def workers(self) -> dict[int, int]:
        """worker index -> pid"""
        out = {}
        for pid, _ in children_of(self.proc.pid):
            index = env_of(pid).get("CHAT_APP_WORKER")
            if index is not None:
                out[int(index)] = pid
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    a = Supervised(tmp_path_factory.mktemp("workers"))
    yield a
    a.stop()


def send(c: Client, text: str):
    return c.predict(text, "", 64, *GREEDY, api_name="/send")


def test_it_runs_as_two_workers_and_a_model_server_behind_one_port(app):
    kids = children_of(app.proc.pid)
    assert sorted(app.workers()) == [0, 1]
    assert sum("infer_engine.server" in cmd for _, cmd in kids) == 1
    for pid in app.workers().values():  # the workers listen on 127.0.0.1 only, over the model server
        env = env_of(pid)
        assert env["APP_HOST"] == "127.0.0.1" and env["ENGINE_BACKEND"] == "api"
        assert env["ENGINE_API_BASE_URL"].startswith("http://127.0.0.1:")


def test_gradio_client_and_plain_http_keep_their_conversation(app):
    c = Client(f"http://127.0.0.1:{app.port}/", verbose=False)
    send(c, "first question")
    history, _, stats = send(c, "second question")
    assert [m["content"].split(" w")[0] for m in history] == [
        "first question", "You said: first question", "second question", "You said: second question"]
    assert "tokens" in stats
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
    conn.request("POST", "/gradio_api/call/send", body=json.dumps({"data": ["over http", "", 32, *GREEDY]}),
                 headers={"Content-Type": "application/json"})
    event = json.loads(conn.getresponse().read())["event_id"]
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
    conn.request("GET", f"/gradio_api/call/send/{event}")
    body = conn.getresponse().read().decode()
    assert "event: complete" in body and "You said: over http" in body


@pytest.mark.slow
def test_new_browsers_are_spread_over_the_workers_and_each_keeps_its_chats(app, browser):
    """Page loads go to the worker with the fewest open connections (each page holds one, its
    queue stream; another test's client may hold one too): four visitors use both workers."""
    pages = []
    for who in ("alice", "bob", "carol", "dave"):
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        open_page(page, f"http://127.0.0.1:{app.port}/")
        page.locator("#input textarea").fill(f"hello from {who}")
        page.locator("#input textarea").press("Enter")
        pages.append((who, ctx, page))
    workers = set()
    for who, ctx, page in pages:
        page.wait_for_function("() => /\\d+ tokens/.test(document.querySelector('#stats').innerText)")
        assert f"You said: hello from {who}" in page.locator("#chatbot").inner_text()
        workers.add(next(c["value"] for c in ctx.cookies() if c["name"] == COOKIE))
        page.reload()
        page.wait_for_function(f"() => (document.querySelector('#chatbot') || {{}}).innerText?.includes("
                               f"'hello from {who}')")
        shown = page.locator("#chatbot").inner_text()
        assert not [o for o, _, _ in pages if o != who and f"hello from {o}" in shown]  # no one else's chat
    assert workers == {"0", "1"}  # the new visitors were spread over the two processes
    pages[0][2].screenshot(path=str(ROOT / "tests" / "artifacts" / "workers-page.png"))
    for _, ctx, _ in pages:
        ctx.close()


def test_a_killed_worker_is_started_again_and_its_visitors_are_served(app):
    old = app.workers()[1]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: app.workers().get(1) not in (None, old), "worker-1 to be started again")
    wait_until(lambda: answers(app.port, "/", f"{COOKIE}=1") == 200, "worker-1 to answer")
    c = Client(f"http://127.0.0.1:{app.port}/", verbose=False, headers={"Cookie": f"{COOKIE}=1"})
    history, *_ = send(c, "after the restart")
    assert history[-1]["content"].startswith("You said: after the restart")
    assert "worker-1 exited with -9: starting it again" in app.log.read_text()


def test_ctrl_c_stops_every_process(tmp_path):
    a = Supervised(tmp_path)
    kids = [pid for pid, _ in children_of(a.proc.pid)]
    assert len(kids) == 3
    assert a.stop() == 0
    def ended(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    for pid in kids:
        wait_until(lambda pid=pid: ended(pid), f"process {pid} to end", 60)


def test_start_up_failures_are_one_line_and_nothing_keeps_running(tmp_path):
    missing = tmp_path / "no-such-model"
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--workers", "2", "--backend", "transformers",
                        "--model-path", str(missing), "--host", "127.0.0.1", "--port", str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and str(missing) in r.stderr
    port = free_port()
    import socket
    with socket.socket() as s:  # the port is taken: said before anything starts
        s.bind(("127.0.0.1", port))
        s.listen()
        r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--workers", "2", "--backend", "synthetic",
                            "--host", "127.0.0.1", "--port", str(port), "--no-history", "true"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
