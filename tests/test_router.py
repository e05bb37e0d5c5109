"""The router in front of several app processes (chat_ui/router.py), over real sockets on
127.0.0.1: two stand-in workers that answer with their name and the head they were sent."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from chat_ui.router import COOKIE, Router, StickyCookie, Worker, worker_cookie
from infer_engine.server import free_port


class Upstreams:
    """Two stand-in workers and the router before them, on an event loop of their own."""

    def __init__(self, **router_kw):
        self.loop = asyncio.new_event_loop()
        self.heads: list[tuple[int, bytes]] = []
        self.closed = threading.Event()  # a slow answer's connection was closed by the router
        self.workers = [Worker("127.0.0.1", free_port(), up=True) for _ in range(2)]
        self.router = Router(self.workers, **router_kw)
        self.port = free_port()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            for i, w in enumerate(self.workers):
                await asyncio.start_server(lambda r, wr, i=i: self._answer(i, r, wr), w.host, w.port)
            await self.router.serve("127.0.0.1", self.port)
            ready.set()
        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _answer(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append((i, head))
        if b"/slow" in head.split(b"\r\n")[0]:  # a stream that goes on until the client leaves
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            try:
                while True:
                    writer.write(b"data: tick\n\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
            except (ConnectionError, OSError):
                self.closed.set()
            return
        body = f"worker {i}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def routed():
    u = Upstreams(head_timeout=1.0, max_connections=8)
    yield u
    u.stop()


def request(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def get(port: int, path: str = "/x", **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return request(port, "\r\n".join(lines) + "\r\n\r\n")


def test_a_cookie_naming_a_worker_goes_to_it_and_other_cookies_are_ignored(routed):
    assert get(routed.port, Cookie=f"a=1; {COOKIE}=1; b=2").endswith(b"worker 1")
    assert get(routed.port, Cookie=f"{COOKIE}=0").endswith(b"worker 0")
    assert worker_cookie(f"{COOKIE}=7", 2) is None and worker_cookie(f"x{COOKIE}=1", 2) is None


def test_new_visitors_page_loads_are_spread_and_api_clients_stay_on_one_worker(routed):
    pages = {get(routed.port, "/", Accept="text/html,*/*")[-1:] for _ in range(4)}
    assert pages == {b"0", b"1"}  # both idle: taken in turn
    api = {get(routed.port, "/gradio_api/queue/data?session_hash=x")[-1:] for _ in range(6)}
    assert len(api) == 1  # one client address, one worker: its join and its data stream meet


def test_each_request_reaches_the_worker_alone_with_connection_close_and_the_client_address(routed):
    get(routed.port, "/h", Cookie=f"{COOKIE}=0", Connection="keep-alive", Keep_Alive="timeout=5",
        X_Forwarded_For="10.0.0.9")
    _, head = routed.heads[-1]
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /h HTTP/1.1"
    assert "Connection: close" in lines and not any(ln.lower().startswith("keep-alive") for ln in lines)
    assert "X-Forwarded-For: 10.0.0.9, 127.0.0.1" in lines
    assert sum(ln.lower().startswith("connection") for ln in lines) == 1


def test_a_body_after_the_head_is_relayed_as_it_came(routed):
    out = request(routed.port, f"POST /p HTTP/1.1\r\nHost: t\r\nCookie: {COOKIE}=1\r\nContent-Length: 5\r\n\r\nhello")
    assert out.endswith(b"worker 1")


def test_bad_heads_get_4xx_without_reaching_a_worker(routed):
    seen = len(routed.heads)
    assert get(routed.port, "/big", X_Big="a" * 70_000).startswith(b"HTTP/1.1 431")
    assert request(routed.port, "NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", routed.port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: slow")  # never finished: the router answers and closes
        assert s.recv(1024).startswith(b"HTTP/1.1 408")
    assert len(routed.heads) == seen


def test_a_worker_that_is_down_gets_a_503_saying_to_retry(routed):
    routed.workers[1].port = free_port()  # nothing listens there
    out = get(routed.port, Cookie=f"{COOKIE}=1")
    assert out.startswith(b"HTTP/1.1 503") and b"Retry-After: 2" in out
    for w in routed.workers:
        w.up = False
    assert get(routed.port, "/", Accept="text/html").startswith(b"HTTP/1.1 503")


@pytest.fixture
def capped():
    u = Upstreams(head_timeout=120.0, max_connections=8)  # held connections stay held for the test
    yield u
    u.stop()


def test_connections_past_the_cap_are_refused_and_the_rest_still_answered(capped):
    routed = capped
    held = [socket.create_connection(("127.0.0.1", routed.port)) for _ in range(8)]
    try:
        deadline = time.time() + 30
        while routed.router.connections < 8 and time.time() < deadline:
            time.sleep(0.01)
        assert get(routed.port).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()
    deadline = time.time() + 30
    while routed.router.connections and time.time() < deadline:
        time.sleep(0.01)
    assert get(routed.port, Cookie=f"{COOKIE}=0").endswith(b"worker 0")


def test_a_client_that_leaves_a_stream_closes_the_workers_connection(routed):
    s = socket.create_connection(("127.0.0.1", routed.port), timeout=30)
    s.sendall(f"GET /slow HTTP/1.1\r\nHost: t\r\nCookie: {COOKIE}=0\r\n\r\n".encode())
    assert b"data: tick" in s.recv(4096)
    s.close()  # a browser that stops reading a reply
    assert routed.closed.wait(30)


def test_the_workers_cookie_is_set_when_the_request_does_not_name_that_worker():
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        sent.append(message)

    def run(cookie: bytes) -> list:
        sent.clear()
        scope = {"type": "http", "headers": [(b"cookie", cookie)] if cookie else []}
        asyncio.run(StickyCookie(app, 1)(scope, None, send))
        return sent[0]["headers"]

    assert (b"set-cookie", f"{COOKIE}=1; Path=/; HttpOnly; SameSite=Lax".encode()) in run(b"")
    assert any(k == b"set-cookie" for k, _ in run(f"{COOKIE}=0".encode()))
    assert run(f"{COOKIE}=1".encode()) == [(b"x", b"y")]
