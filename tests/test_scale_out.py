"""Replicas behind LMDeploy's request router, on the CPU: `lmdeploy serve proxy` and two of our
servers on the tiny model registered with it (--proxy-url), our api backend and the app
pointed at the proxy. One replica is killed while two streams run: the one on it ends with a
readable error, the other goes on, new requests reach the survivor, the app stays up.

Routing is LMDeploy's min_expected_latency: the fewest unfinished requests wins, so of two
streams started one after the other (the first already streaming) each lands on its own
replica; which one dies with the killed replica is not known in advance, only that exactly one
does."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, open_page
from infer_engine import BackendUnavailable, EngineSettings, SamplingParams, create_engine
from infer_engine.server import free_port

pytest.importorskip("lmdeploy")
pytest.importorskip("aiohttp")
MODEL = "tiny-chat"


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_until(check, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_ports_in_a_row(n: int) -> int:
    """A first port p such that p .. p+n-1 are all free (the launcher's --base-port)."""
    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True
    while True:
        first = free_port()
        if all(free(first + i) for i in range(1, n)):
            return first


def logs_of(folder: Path) -> str:
    """Every log under folder, its last lines: what a failure report needs."""
    parts = []
    for f in sorted(folder.rglob("*.log")):
        parts.append(f"--- {f.relative_to(folder)}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


class Cluster:
    """The proxy and N replicas as separate processes, as a deployment runs them."""

    def __init__(self, tmp: Path, model: Path, replicas: int = 2):
        self.tmp, self.model = tmp, model
        self.proxy_port = free_port()
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        env = dict(os.environ, LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION="1")  # drop dead replicas fast
        self.proxy = self._spawn("proxy", [sys.executable, "-m", "lmdeploy.serve.proxy.proxy", "--server_name",
                                           "127.0.0.1", "--server_port", str(self.proxy_port),
                                           "--disable_cache_status", "True"], env)
        wait_until(lambda: get_json(self.proxy_url + "/nodes/status") == {}, "the proxy")
        self.replicas = {}
        for _ in range(replicas):
            port = free_port()
            self.replicas[f"http://127.0.0.1:{port}"] = self._spawn(f"replica-{port}", [
                sys.executable, "-m", "infer_engine.server", "--model-path", str(model), "--port", str(port),
                "--served-model-name", MODEL, "--proxy-url", self.proxy_url])
        wait_until(lambda: sorted(self.nodes()) == sorted(self.replicas), "both replicas registered")

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)

    def nodes(self) -> list[str]:
        return list(get_json(self.proxy_url + "/nodes/status"))

    def engine(self):
        s = EngineSettings(backend="api")
        s.api.base_url, s.api.model, s.api.max_retries, s.api.timeout = f"{self.proxy_url}/v1", MODEL, 4, 120
        return create_engine(s)

    def close(self):
        for p in [*self.replicas.values(), self.proxy]:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in [*self.replicas.values(), self.proxy]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def cluster(tiny_model, tmp_path):
    c = Cluster(tmp_path, tiny_model)
    yield c
    c.close()


LONG = SamplingParams(max_new_tokens=4000, temperature=0, ignore_eos=True)


class Stream:
    """One streamed chat on a thread: its pieces as they come, and how it ended."""

    def __init__(self, engine, sid: str):
        self.pieces, self.error, self.done = [], None, threading.Event()
        self.engine, self.sid = engine, sid
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            for d in self.engine.stream_chat([{"role": "user", "content": "Count with me."}], LONG, self.sid):
                self.pieces.append(d.text)
        except Exception as exc:  # what the caller of a cut reply gets
            self.error = exc
        finally:
            self.done.set()

    def streaming(self, n: int = 5) -> bool:
        return len(self.pieces) >= n


def test_replicas_share_the_load_and_a_dead_one_costs_only_its_own_streams(cluster):
    engine = cluster.engine()
    # a request through the proxy is answered by a replica
    text, usage = engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=4, temperature=0))
    assert usage.completion_tokens >= 1
    # two long streams, the second started while the first streams: one on each replica
    a = Stream(engine, "a")
    wait_until(a.streaming, "the first stream")
    b = Stream(engine, "b")
    wait_until(b.streaming, "the second stream")
    victim_url, victim = next(iter(cluster.replicas.items()))
    victim.kill()  # SIGKILL: no goodbye to the proxy
    victim.wait()
    wait_until(lambda: a.done.is_set() or b.done.is_set(), "the cut stream to end")
    cut, survivor = (a, b) if a.done.is_set() else (b, a)
    assert isinstance(cut.error, BackendUnavailable), cut.error
    assert "cut off" in cut.error.message and len(cut.pieces) >= 5  # what came before stays with the caller
    # the other stream goes on
    before = len(survivor.pieces)
    wait_until(lambda: len(survivor.pieces) > before + 20, "the surviving stream to go on")
    assert survivor.error is None and not survivor.done.is_set()
    engine.cancel(survivor.sid)
    survivor.done.wait(30)
    # new requests reach the survivor (the proxy's in-band "replica gone" is retried before any token)
    for i in range(4):
        text, usage = engine.chat([{"role": "user", "content": f"again {i}"}],
                                  SamplingParams(max_new_tokens=4, temperature=0), f"n{i}")
        assert usage.completion_tokens >= 1
    wait_until(lambda: cluster.nodes() == [u for u in cluster.replicas if u != victim_url], "the dead replica dropped")
    engine.close()


def test_a_replica_that_stops_leaves_the_proxy(cluster):
    url, proc = next(iter(cluster.replicas.items()))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert url not in cluster.nodes()  # said goodbye on the way out: no heartbeat needed
    assert "left the proxy" in (cluster.tmp / f"replica-{url.rsplit(':', 1)[1]}.log").read_text()


def test_the_app_behind_the_proxy_stays_up_when_a_replica_dies(cluster, tmp_path_factory):
    from gradio_client import Client

    from chat_ui.history import ERROR_MARK, text_of
    from chat_ui.ui import ChatUI, launch
    from test_app import GREEDY, app_settings

    engine, other = cluster.engine(), cluster.engine()
    settings = app_settings(tmp_path_factory, max_new_tokens=4000)
    demo = ChatUI(engine, settings).build()
    launch(demo, settings, prevent_thread_lock=True)
    try:
        c = Client(f"http://127.0.0.1:{settings.port}/", verbose=False)
        job = c.submit("Count with me.", "", 4000, *GREEDY, api_name="/send")

        def app_streaming() -> bool:
            outs = job.outputs()
            return bool(outs) and len(outs[-1][0]) == 2 and len(text_of(outs[-1][0][-1]["content"])) > 20
        wait_until(app_streaming, "the app's reply to stream")
        s = Stream(other, "beside")  # the least-loaded replica: the one the app's reply is not on
        wait_until(s.streaming, "the second stream")
        victim = next(iter(cluster.replicas.values()))
        victim.kill()
        victim.wait()
        wait_until(lambda: s.done.is_set() or job.done() or job.outputs() and ERROR_MARK in str(job.outputs()[-1][0]),
                   "one of the two to be cut")
        if s.done.is_set():  # the other stream was on the dead replica; the app's goes on
            assert isinstance(s.error, BackendUnavailable)
            c.predict(api_name="/stop")  # Stop, as a visitor would, before the next message
            history, _, _ = job.result(timeout=120)
            assert not text_of(history[-1]["content"]).startswith(ERROR_MARK)
        else:  # the app's reply was: the part that came stays, with a notice a visitor can read
            history, _, stats = job.result(timeout=120)
            assert len(text_of(history[1]["content"])) > 20
            notice = text_of(history[-1]["content"])
            assert notice.startswith(ERROR_MARK) and "not reachable" in notice and "127.0.0.1" not in notice
            other.cancel("beside")
        history, _, _ = c.predict("Still there?", "", 8, *GREEDY, api_name="/send")
        assert not text_of(history[-1]["content"]).startswith(ERROR_MARK)  # answered by the survivor
    finally:
        demo.close()
        engine.close()
        other.close()


def test_one_command_starts_the_proxy_the_replicas_and_the_app(tmp_path):
    """scripts/launch_replicas.py (synthetic replicas: no model needed): all up, the app answers
    through the proxy, a replica that dies is started again and registers anew, SIGTERM stops
    every process."""
    from gradio_client import Client

    from chat_ui.history import text_of
    from test_app import GREEDY

    ports = dict(proxy=free_port(), base=free_ports_in_a_row(2), app=free_port())
    out = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen([sys.executable, "scripts/launch_replicas.py", "--backend", "synthetic",
                                 "--replicas", "2", "--proxy-port", str(ports["proxy"]),  # default hosts
                                 "--base-port", str(ports["base"]), "--app-port", str(ports["app"]),
                                 "--log-dir", str(tmp_path / "logs"), "--", "--synthetic-tokens-per-s", "200"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, LMDEPLOY_CONTROLLER_HEART_BEAT_EXPIRATION="1",
                                         APP_HISTORY_PATH=str(tmp_path / "chats.sqlite3")))
    log = tmp_path / "launcher.log"
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    try:
        wait_until(lambda: "ready:" in log.read_text() or launcher.poll() is not None, "the launcher to say ready",
                   300)
        assert "ready:" in log.read_text(), logs_of(tmp_path)
        replicas = [f"http://127.0.0.1:{ports['base'] + i}" for i in range(2)]
        assert sorted(get_json(proxy + "/nodes/status")) == replicas
        # by default nothing of it answers on another address of this machine (it bound 0.0.0.0 before:
        # from another client a rogue node was added and the real ones removed through the proxy)
        for port in (ports["proxy"], ports["app"], *(ports["base"] + i for i in range(2))):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.2", port), timeout=5).close()
        c = Client(f"http://127.0.0.1:{ports['app']}/", verbose=False)
        history, _, _ = c.predict("hello there", "", 16, *GREEDY, api_name="/send")
        assert text_of(history[-1]["content"]) == "You said: hello there"
        # a replica dies: started again, registered again
        pid = int(subprocess.run(["pgrep", "-f", "--", f"infer_engine.server .*--port {ports['base'] + 1} "],
                                 capture_output=True, text=True).stdout.split()[0])
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "replica-1" in log.read_text() and "starting it again" in log.read_text(), "the restart")
        wait_until(lambda: sorted(get_json(proxy + "/nodes/status")) == replicas, "the restarted replica registered")
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0, logs_of(tmp_path)
    assert "stopped" in log.read_text()
    for port in ports.values():  # nothing is left listening
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_the_launcher_refuses_a_port_in_use_naming_it(tmp_path):
    base = free_ports_in_a_row(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        r = subprocess.run([sys.executable, "scripts/launch_replicas.py", "--backend", "synthetic", "--replicas", "2",
                            "--host", "127.0.0.1", "--proxy-port", str(free_port()), "--base-port", str(base),
                            "--no-app", "--log-dir", str(tmp_path / "logs")], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"error: port {base + 1} (replica-1) is in use on 127.0.0.1: stop what listens there or choose another "
        "--base-port")
    assert not list((tmp_path / "logs").glob("*.log"))  # nothing was started


@pytest.mark.slow
def test_app_replicas_on_one_chat_store_show_the_same_chats(tmp_path, browser):
    """Several app processes behind one address (any balancer, no sticky sessions) share the
    SQLite store (--history-path on one disk; WAL mode): a chat written through one replica is
    there, in the page, through the other. A browser's id is its HttpOnly cookie, which it sends
    to both replicas (cookies are kept per host, not per port)."""
    db, ports = tmp_path / "chats.sqlite3", [free_port(), free_port()]
    apps = [subprocess.Popen([sys.executable, "app.py", "--backend", "synthetic", "--host", "127.0.0.1",
                              "--port", str(port), "--history-path", str(db)], cwd=ROOT,
                             stdout=open(tmp_path / f"app-{port}.log", "w"), stderr=subprocess.STDOUT)
            for port in ports]  # started together: they agree on the store's secret
    try:
        for port, proc in zip(ports, apps):
            wait_until(lambda port=port, proc=proc: proc.poll() is not None or urllib.request.urlopen(
                f"http://127.0.0.1:{port}/", timeout=5).status == 200, f"the app on {port}")
            assert proc.poll() is None, logs_of(tmp_path)
        ctx = browser.new_context()
        a = ctx.new_page()
        open_page(a, f"http://127.0.0.1:{ports[0]}/")
        a.locator("#input textarea").fill("written through replica one")
        a.locator("#input textarea").press("Enter")
        a.locator('#chatbot [data-testid="bot"]').filter(has_text="You said: written").wait_for()
        b = ctx.new_page()
        open_page(b, f"http://127.0.0.1:{ports[1]}/")
        b.locator('#chatbot [data-testid="user"]').filter(has_text="written through replica one").wait_for()
        b.locator("#input textarea").fill("and on through replica two")
        b.locator("#input textarea").press("Enter")
        b.locator('#chatbot [data-testid="bot"]').filter(has_text="You said: and on").wait_for()
        a.reload()
        a.locator('#chatbot [data-testid="bot"]').filter(has_text="You said: and on").wait_for()
    finally:
        for p in apps:
            p.send_signal(signal.SIGINT)
            p.wait(timeout=30)
