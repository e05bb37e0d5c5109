"""Who a request is from, and what each visitor may leave on the server, without Gradio.

- The browser id, the bearer token of a browser's chats, lives in an HttpOnly, SameSite=Lax
  cookie the app sets (`BrowserCookie`): page scripts cannot read it (it used to sit in
  localStorage, encrypted with a secret the page's /config served to everyone).
- Uploads (image apps only): each file is checked as an image on arrival, counted against its
  visitor's share (files and bytes per 10 minutes), and bound to that visitor: a message may
  name only files its own visitor uploaded (`UploadGuard`, `Uploads`). Gradio's cache is swept
  of files older than an hour by `sweep_cache` (Gradio's own sweep dies when an upload lands
  while it runs).
- Exports are served once, from memory, to the browser that asked (`Downloads`): no file is
  left in Gradio's cache, and the link is useless to anyone else.

A visitor is its browser id, or, for a client that keeps no cookies (gradio_client, curl), its
address ("ip:...").
"""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

from loguru import logger

from .store import valid_browser_id

BROWSER_COOKIE = "chat-browser"
UPLOAD_WINDOW_S = 600.0
UPLOAD_FILES_PER_WINDOW = 40


def cookie_value(headers: Any, name: str) -> str | None:
    """A cookie's value from ASGI headers ((bytes, bytes) pairs) or a mapping with "cookie"."""
    raw = headers.get("cookie", "") if hasattr(headers, "get") else \
        next((v.decode("latin-1") for k, v in headers if k == b"cookie"), "")
    for part in (raw or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def browser_of(headers: Any) -> str | None:
    """The browser id a request's cookie carries, if it carries a valid one."""
    value = cookie_value(headers, BROWSER_COOKIE)
    return value if valid_browser_id(value) else None


def visitor_of(headers: Any, client_host: str | None) -> str:
    return browser_of(headers) or f"ip:{client_host or '-'}"


def visitor_of_request(request: Any) -> str | None:
    """The visitor of a Gradio event's request (None without one: an internal call)."""
    if request is None or getattr(request, "headers", None) is None:
        return None
    client = getattr(request, "client", None)
    return visitor_of(request.headers, getattr(client, "host", None))


class BrowserCookie:
    """ASGI middleware: a request without a valid browser cookie gets one (a new random id), in
    its own headers (the handlers see it at once) and on its answer."""

    def __init__(self, app: Any, max_age_s: int):
        self.app, self.max_age_s = app, max_age_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or browser_of(scope.get("headers") or []):
            return await self.app(scope, receive, send)
        from .store import new_browser_id

        browser = new_browser_id()
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"cookie"]
        old = b"; ".join(v for k, v in scope.get("headers") or [] if k == b"cookie")
        joined = (old + b"; " if old else b"") + f"{BROWSER_COOKIE}={browser}".encode()
        scope = {**scope, "headers": [*headers, (b"cookie", joined)]}
        https = scope.get("scheme") == "https" or dict(scope.get("headers") or []).get(b"x-forwarded-proto") == b"https"
        cookie = (f"{BROWSER_COOKIE}={browser}; Path=/; HttpOnly; SameSite=Lax; Max-Age={self.max_age_s}"
                  + ("; Secure" if https else "")).encode()

        async def with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", cookie)]}
            await send(message)
        await self.app(scope, receive, with_cookie)


class Uploads:
    """Which visitor uploaded which file, and how much each uploaded lately (thread-safe)."""

    def __init__(self, bytes_per_window: int, files_per_window: int = UPLOAD_FILES_PER_WINDOW,
                 window_s: float = UPLOAD_WINDOW_S, max_visitors: int = 10_000):
        self.bytes_per_window, self.files_per_window, self.window_s = bytes_per_window, files_per_window, window_s
        self._owner: OrderedDict[str, tuple[str, float]] = OrderedDict()  # path -> (visitor, when)
        self._recent: dict[str, deque] = {}  # visitor -> (when, bytes) of its recent uploads
        self._lock = threading.Lock()
        self.max_visitors = max_visitors

    def admit(self, visitor: str, files: int, size: int) -> str:
        """"" if the visitor may upload this much now, else why not (in words)."""
        now = time.time()
        with self._lock:
            recent = self._recent.setdefault(visitor, deque())
            while recent and recent[0][0] < now - self.window_s:
                recent.popleft()
            n, total = sum(1 for _ in recent), sum(b for _, b in recent)
            if n + files > self.files_per_window or total + size > self.bytes_per_window:
                return (f"Too many uploads: at most {self.files_per_window} images and "
                        f"{self.bytes_per_window / 2**20:g} MB each {self.window_s / 60:g} minutes. Please wait a little.")
            recent.extend([(now, size // max(1, files))] * files)
            if len(self._recent) > self.max_visitors:  # the least recent visitors are forgotten first
                for key in list(self._recent)[: len(self._recent) - self.max_visitors]:
                    del self._recent[key]
            return ""

    def own(self, visitor: str, paths: list[str]) -> None:
        now = time.time()
        with self._lock:
            for p in paths:
                self._owner[str(Path(p).resolve())] = (visitor, now)
                self._owner.move_to_end(str(Path(p).resolve()))
            while self._owner and next(iter(self._owner.values()))[1] < now - 2 * 3600:
                self._owner.popitem(last=False)

    def owned(self, visitor: str, path: str | Path) -> bool:
        with self._lock:
            return self._owner.get(str(Path(path).resolve()), ("", 0))[0] == visitor


class UploadGuard:
    """ASGI middleware before Gradio's upload route (image apps): the visitor's share checked
    from the request's size, every file checked as an image before Gradio keeps it (a few
    checks at once: memory stays bounded), and the files Gradio kept bound to the visitor."""

    def __init__(self, app: Any, uploads: Uploads, check: Any, max_file_bytes: int, at_once: int = 2):
        self.app, self.uploads, self.check, self.max_file_bytes = app, uploads, check, max_file_bytes
        self._checking = asyncio.Semaphore(at_once)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        visitor = visitor_of(headers, (scope.get("client") or ("-",))[0])
        length = int(dict(headers).get(b"content-length", b"0") or 0)
        why = self.uploads.admit(visitor, 1, length)
        if why:
            return await _answer(send, 429, why)
        async with self._checking:
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            status, problem = await asyncio.to_thread(self._check_all, scope, bytes(body))
        if problem:
            return await _answer(send, status, problem)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()
        kept = bytearray()

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.body":
                kept.extend(message.get("body", b""))
                if not message.get("more_body"):
                    try:
                        self.uploads.own(visitor, [p for p in json.loads(bytes(kept)) if isinstance(p, str)])
                    except (ValueError, TypeError):
                        pass
            await send(message)
        await self.app(scope, replay, capture)

    def _check_all(self, scope: dict, body: bytes) -> tuple[int, str]:
        """(200, "") when every file of the multipart body is an image the app takes, else the
        status and why not (413 for a file over the size limit, 400 for what is no image)."""
        from multipart import MultipartParser  # python-multipart, which Gradio and starlette use

        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        boundary = next((p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary=")),
                        "")
        if not boundary:
            return 400, "Not a file upload."
        files: list[tuple[str, bytearray]] = []
        current: dict = {}

        def on_part_begin() -> None:
            current.clear()
            current["data"] = bytearray()

        def on_header_value(data: bytes, start: int, end: int) -> None:
            text = data[start:end].decode("latin-1")
            if "filename=" in text:
                current["name"] = text.split("filename=", 1)[1].strip('"; ')

        def on_part_data(data: bytes, start: int, end: int) -> None:
            current["data"] += data[start:end]

        def on_part_end() -> None:
            if "name" in current:
                files.append((current["name"], current["data"]))

        parser = MultipartParser(boundary.encode(), {"on_part_begin": on_part_begin, "on_header_value": on_header_value,
                                                     "on_part_data": on_part_data, "on_part_end": on_part_end})
        parser.write(body)
        parser.finalize()
        for name, data in files:
            if len(data) > self.max_file_bytes:
                return 413, (f"That image cannot be used. {name}: larger than {self.max_file_bytes / 2**20:g} MB, "
                             "the most one image may be.")
            try:
                self.check(bytes(data), name)
            except Exception as exc:  # the image check's own words
                return 400, f"That image cannot be used. {getattr(exc, 'message', exc)}."
        return 200, ""


async def _answer(send: Any, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Downloads:
    """Export files kept in memory until their browser fetches them (once, within `ttl_s`), at
    most `max_bytes` in all (the oldest go first): nothing is written to Gradio's cache."""

    def __init__(self, ttl_s: float = 600.0, max_bytes: int = 64 * 2**20):
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._items: OrderedDict[str, tuple[str, str, bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, visitor: str, name: str, body: bytes) -> str:
        token = secrets.token_urlsafe(18)
        with self._lock:
            self._items[token] = (visitor, name, body, time.time() + self.ttl_s)
            while sum(len(b) for _, _, b, _ in self._items.values()) > self.max_bytes and len(self._items) > 1:
                self._items.popitem(last=False)
        return token

    def take(self, token: str, visitor: str) -> tuple[str, bytes] | None:
        with self._lock:
            item = self._items.get(token)
            if item is None or item[0] != visitor or item[3] < time.time():
                return None
            del self._items[token]
            return item[1], item[2]


_SWEPT: dict[Path, threading.Thread] = {}  # one sweeper per folder in a process, however many apps launch


def sweep_cache(folder: Path, max_age_s: float = 3600.0, every_s: float = 600.0) -> threading.Thread:
    """A thread removing files older than `max_age_s` from Gradio's cache folder every `every_s`,
    whatever else happens in the folder meanwhile (one per folder and process)."""
    if folder in _SWEPT:
        return _SWEPT[folder]
    def sweep() -> None:
        while True:
            cutoff, gone = time.time() - max_age_s, 0
            try:
                for path in list(folder.rglob("*")):
                    try:
                        if path.is_file() and path.stat().st_mtime < cutoff:
                            path.unlink()
                            gone += 1
                    except OSError:  # gone meanwhile, or being written
                        continue
            except OSError:
                pass
            if gone:
                logger.info("cache sweep: {} files older than {:.0f} s removed from {}", gone, max_age_s, folder)
            time.sleep(every_s)

    thread = _SWEPT[folder] = threading.Thread(target=sweep, name="cache-sweep", daemon=True)
    thread.start()
    return thread


def image_check(max_bytes: int):
    """The upload check: the bytes must be an image the engine's own check takes."""
    def check(data: bytes, name: str) -> None:
        import base64

        from infer_engine.errors import InvalidRequest
        from infer_engine.images import load_image

        if len(data) > max_bytes:
            raise InvalidRequest(f"{name}: larger than {max_bytes / 2**20:g} MB")
        load_image("data:image/png;base64," + base64.b64encode(data).decode(), name)  # PIL reads what it is
    return check


__all__ = ["BROWSER_COOKIE", "BrowserCookie", "Downloads", "UploadGuard", "Uploads", "browser_of", "cookie_value",
           "image_check", "sweep_cache", "visitor_of"]
