"""One public port in front of several app processes (`--workers N`), each visitor kept on one.

Gradio keeps a visitor's session in the memory of the process that served it: the queue's
event stream, the state of the page's events, the reply being written (Gradio's maintainers:
several processes need sticky sessions; uvicorn's own `--workers` cannot give them). So every
request is sent, from its head alone, to the process that holds its session:

- a `chat-worker` cookie naming a worker: that worker (each worker sets the cookie to itself on
  its answers, so a browser stays where its first page load went);
- else a page load (a GET asking for HTML): the worker with the fewest open connections;
- else (an API client that keeps no cookies: gradio_client, curl): a hash of the client's
  address, so that its queue/join and its data stream meet in one process.

Each client connection carries one request: the router forwards the head with `Connection:
close`, so the next request comes on a new connection and is routed on its own (also behind a
gateway that reuses one connection for many visitors). After the head, the bytes go through
untouched, both ways. A head must arrive within `head_timeout` seconds and fit in 64 KiB, and
at most `max_connections` are open at once (past it, new ones get a 503 at once).
"""
from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass
from typing import Sequence

COOKIE = "chat-worker"
MAX_HEAD = 64 * 1024
RELAY_CHUNK = 64 * 1024


def worker_cookie(cookie_header: str, workers: int) -> int | None:
    """The worker a Cookie header names, if it names one of `workers`."""
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value.isdigit() and int(value) < workers:
            return int(value)
    return None


def set_cookie_header(index: int) -> bytes:
    return f"{COOKIE}={index}; Path=/; HttpOnly; SameSite=Lax".encode()


class StickyCookie:
    """ASGI middleware of worker `index`: answers a request that does not name this worker in its
    `chat-worker` cookie with one that does (the router then keeps the browser here)."""

    def __init__(self, app, index: int):
        self.app, self.index, self.header = app, index, set_cookie_header(index)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cookie = next((v for k, v in scope.get("headers") or () if k == b"cookie"), b"")
        if worker_cookie(cookie.decode("latin-1"), self.index + 1) == self.index:
            return await self.app(scope, receive, send)

        async def with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", self.header)]}
            await send(message)
        return await self.app(scope, receive, with_cookie)


@dataclass
class Worker:
    host: str
    port: int
    up: bool = False      # answering (the supervisor says so)
    open: int = 0         # connections relayed to it now


def _answer(status: str, text: str, retry_after: int | None = None) -> bytes:
    body = text.encode()
    extra = f"Retry-After: {retry_after}\r\n" if retry_after else ""
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


class Router:
    def __init__(self, workers: Sequence[Worker], head_timeout: float = 10.0, max_connections: int = 4096):
        self.workers = list(workers)
        self.head_timeout, self.max_connections = head_timeout, max_connections
        self.connections = 0
        self._turn = 0

    def choose(self, method: str, headers: dict[str, str], peer: str) -> Worker | None:
        n = len(self.workers)
        named = worker_cookie(headers.get("cookie", ""), n)
        if named is not None:
            return self.workers[named]
        up = [w for w in self.workers if w.up]
        if not up:
            return None
        if method == "GET" and "text/html" in headers.get("accept", ""):  # a new visitor's page load
            self._turn += 1
            return min(up, key=lambda w: (w.open, (self.workers.index(w) - self._turn) % n))
        return up[zlib.crc32(peer.encode()) % len(up)]

    async def serve(self, host: str, port: int) -> asyncio.base_events.Server:
        return await asyncio.start_server(self._connection, host, port, limit=MAX_HEAD, backlog=2048)

    async def _connection(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        worker: Worker | None = None
        try:
            if self.connections > self.max_connections:
                await _refuse(creader, cwriter, _answer("503 Service Unavailable",
                                                        "Too many connections; try again shortly.\n", 5))
                return
            try:
                head = await asyncio.wait_for(creader.readuntil(b"\r\n\r\n"), self.head_timeout)
            except asyncio.TimeoutError:
                cwriter.write(_answer("408 Request Timeout", "The request's head did not arrive in time.\n"))
                return
            except asyncio.LimitOverrunError:
                cwriter.write(_answer("431 Request Header Fields Too Large", "The request's head is too large.\n"))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            parsed = _parse_head(head)
            if parsed is None:
                cwriter.write(_answer("400 Bad Request", "Malformed request.\n"))
                return
            method, lines, headers = parsed
            peer = (cwriter.get_extra_info("peername") or ("-",))[0]
            worker = self.choose(method, headers, peer)
            if worker is None:
                cwriter.write(_answer("503 Service Unavailable", "The app is starting; try again shortly.\n", 2))
                return
            worker.open += 1
            try:
                ureader, uwriter = await asyncio.open_connection(worker.host, worker.port, limit=RELAY_CHUNK)
            except OSError:
                cwriter.write(_answer("503 Service Unavailable", "The app is restarting; reload the page in a few "
                                                                 "seconds.\n", 2))
                return
            uwriter.write(_forwarded_head(lines, headers, peer))
            # until either side ends: the worker has answered (and closes), or the client went away
            # (a browser that stops reading a reply closes its connection: the worker must see it)
            relays = {asyncio.ensure_future(_relay(creader, uwriter)), asyncio.ensure_future(_relay(ureader, cwriter))}
            try:
                await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for relay in relays:
                    relay.cancel()
                uwriter.close()
        except ConnectionError:
            pass
        finally:
            self.connections -= 1
            if worker is not None:
                worker.open -= 1
            try:
                cwriter.close()
            except RuntimeError:  # the loop is closing
                pass


def _parse_head(head: bytes) -> tuple[str, list[bytes], dict[str, str]] | None:
    lines = head[:-4].split(b"\r\n")
    request = lines[0].split(b" ")
    if len(request) != 3 or not request[2].startswith(b"HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        key = name.decode("latin-1").lower()
        value_s = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {value_s}" if key in headers and key != "cookie" else \
            (f"{headers[key]}; {value_s}" if key in headers else value_s)
    return request[0].decode("latin-1"), lines, headers


HOP = (b"connection", b"keep-alive", b"proxy-connection")


def _forwarded_head(lines: list[bytes], headers: dict[str, str], peer: str) -> bytes:
    """The request's head as the worker gets it: one request per connection (Connection: close),
    the client's address appended to X-Forwarded-For. An upgrade (WebSocket) keeps its head."""
    if "upgrade" in headers.get("connection", "").lower():
        return b"\r\n".join(lines) + b"\r\n\r\n"
    out = [lines[0]]
    for line in lines[1:]:
        name = line.partition(b":")[0].strip().lower()
        if name not in HOP and name != b"x-forwarded-for":
            out.append(line)
    forwarded = f"{headers['x-forwarded-for']}, {peer}" if "x-forwarded-for" in headers else peer
    out += [b"X-Forwarded-For: " + forwarded.encode("latin-1"), b"Connection: close"]
    return b"\r\n".join(out) + b"\r\n\r\n"


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes) -> None:
    """Answer without reading the request, then read a little of it before closing (as nginx's
    lingering close does): closing with unread data makes the kernel reset the connection, and
    the client would never see the answer."""
    writer.write(answer)
    try:
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await asyncio.wait_for(reader.read(MAX_HEAD), 1.0)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from reader to writer until the reader ends, all of them written."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            if writer.transport.get_write_buffer_size() > RELAY_CHUNK:
                await writer.drain()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
