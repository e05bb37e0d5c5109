"""ASGI middleware shared by our OpenAI server and the Gradio app: a request-body size limit
(no request may make the process read, parse or hold more than it allows) and refused paths."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Sequence

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def _json_error(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


class RequestLimits:
    """Refuse bodies over `max_bytes` with 413 before reading them when Content-Length says so,
    or as soon as a chunked body passes the limit; refuse paths ending in one of `refused`
    (e.g. Gradio's upload route when no component takes files) with 403."""

    def __init__(self, app: Any, max_bytes: int, refused: Sequence[str] = (),
                 refused_reason: str = "not available here"):
        self.app, self.max_bytes, self.refused, self.refused_reason = app, max_bytes, tuple(refused), \
            refused_reason

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.refused and scope["path"].rstrip("/").endswith(self.refused):
            await _discard(receive)
            await self._answer(send, 403, self.refused_reason, "permission_error")
            return
        headers = dict(scope.get("headers") or [])
        encodings = [v for k, v in scope.get("headers") or [] if k == b"transfer-encoding"]
        if encodings and encodings != [b"chunked"]:  # "CHUNKED", " chunked", two headers: as a proxy might
            await _discard(receive)                  # read them otherwise (request smuggling), none is taken
            await self._answer(send, 400, "Transfer-Encoding: only 'chunked' is taken", "invalid_request_error")
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await _discard(receive)
                await self._too_large(send)
                return
            await self.app(scope, receive, send)
            return
        if not encodings:
            await self.app(scope, receive, send)
            return
        # A chunked body: read it here, at most max_bytes, then hand it on in one piece.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _discard(receive)
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        mb = self.max_bytes / 2**20
        await self._answer(send, 413, f"request body too large: the limit is {mb:g} MB", "invalid_request_error")

    @staticmethod
    async def _answer(send: Send, status: int, message: str, kind: str) -> None:
        body = _json_error(status, message, kind)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _discard(receive: Receive, max_bytes: int = 256 * 2**20, seconds: float = 10.0) -> None:
    """Read and drop the rest of a refused body before answering (what nginx's lingering close
    does): a server that answers and closes with unread data makes the kernel reset the
    connection, and the client never sees the answer. Bounded in bytes and time; nothing kept."""
    loop = asyncio.get_running_loop()
    deadline, seen = loop.time() + seconds, 0
    while seen <= max_bytes:
        try:
            message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
