"""What every route of the server shares: the engine and the served name, the API key check,
OpenAI-shaped errors, and starting a request's generations (the part of an endpoint before its
first token, after which streaming.py answers)."""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger

from ..aio import ThreadedStream
from ..base import Delta, Engine
from ..errors import AuthenticationFailed, EngineError, InvalidRequest, ModelNotFound, UnsupportedMediaType
from ..protocol import error_body


@dataclass
class Call:
    """One request's n generations, as the endpoint describes them."""

    path: str                        # for the log line
    obj: str                         # chat.completion | text_completion
    prefix: str                      # id prefix
    chat: bool
    streams: list[ThreadedStream] = field(default_factory=list)
    firsts: list[list[Delta]] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    done: Any = None  # called once when the request's generations have ended

    def cancel(self, engine: Engine) -> None:
        """Stop every generation of this request (a client gone, one choice failed)."""
        for sid in self.sessions:
            engine.cancel(sid)


class FairTurns:
    """The generations the engine runs at once, handed out fairly: a request waits for its turn
    in the event loop (holding no thread), a free turn goes to the waiting client that runs the
    fewest generations (first come first among equals), and one client holds at most `cap` at
    once, so a client that asks for much never takes every turn from the others."""

    def __init__(self, slots: int, cap: int):
        self.slots, self.cap = max(1, slots), max(1, min(cap, slots))
        self.running: dict[str, int] = {}
        self.total = 0
        self._waiting: deque[tuple[str, asyncio.Future]] = deque()

    async def acquire(self, client: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((client, fut))
        self._hand_out()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # given just as it was cancelled: give it back
                self.release(client)
            else:
                self._waiting = deque(w for w in self._waiting if w[1] is not fut)
            raise

    def release(self, client: str) -> None:
        left = self.running.get(client, 0) - 1
        if left > 0:
            self.running[client] = left
        else:
            self.running.pop(client, None)
        self.total -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        while self.total < self.slots:
            able = [(self.running.get(c, 0), i) for i, (c, f) in enumerate(self._waiting)
                    if self.running.get(c, 0) < self.cap and not f.done()]
            if not able:
                return
            _, i = min(able)
            client, fut = self._waiting[i]
            del self._waiting[i]
            self.running[client] = self.running.get(client, 0) + 1
            self.total += 1
            fut.set_result(None)


@dataclass
class ServerContext:
    """What every route shares. The work one request may ask for is bounded: n at most half of
    what the engine runs at once, n x max_tokens at most `max_request_tokens`; its generations
    take turns fairly with every other client's (`FairTurns`: one client holds at most
    `client_share`, by default all but an eighth of the engine's turns)."""

    engine: Engine
    name: str                        # the model id clients name
    api_key: str | None = None
    stream_interval_s: float = 0.0   # a streamed choice's chunks at most this often (0: as they come)
    max_request_tokens: int = 65536  # n x max_tokens of one request, at most
    share: int = 0                   # generations one client may hold at once; 0: all but an eighth
    turns: FairTurns | None = None

    def check_size(self, n: int, max_tokens: int) -> None:
        most = max(1, self.engine.max_concurrency // 2)
        if n > most:
            raise InvalidRequest(f"n: {n} choices is more than the {most} one request may ask for here", param="n")
        if n * max_tokens > self.max_request_tokens:
            raise InvalidRequest(f"n x max_tokens ({n} x {max_tokens}) is more than the {self.max_request_tokens:,} "
                                 "tokens one request may ask for here", param="max_tokens")

    def fair_turns(self) -> FairTurns:
        if self.turns is None:  # made in the server's event loop, on first use
            slots = max(1, self.engine.max_concurrency)
            self.turns = FairTurns(slots, self.share or slots - max(1, slots // 8) if slots > 1 else 1)
        return self.turns

    @staticmethod
    def client_of(request: Request) -> str:
        return request.client.host if request.client else "-"

    def error(self, exc: EngineError, session: str = "-", path: str = "/v1/chat/completions") -> JSONResponse:
        logger.info("{} {} session={} error={!r}", path, exc.status, session, exc.message)
        return JSONResponse(error_body(exc), status_code=exc.status)

    def unauthorized(self, request: Request) -> JSONResponse | None:
        if not self.api_key:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return None
        return self.error(AuthenticationFailed("invalid or missing API key (Authorization: Bearer ...)"),
                          path=request.url.path)

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "infer_engine"}

    async def start(self, request: Request, call: Call, parse: Callable[[bytes], Any],
                    open_stream: Callable[[Any, Any, str], Any]) -> Any:
        """Parse, check and start the request's n generations; their first items are awaited
        here, so what fails before the first token is an HTTP error, not a broken stream."""
        from .streaming import complete, sse

        if (denied := self.unauthorized(request)) is not None:
            return denied
        engine = self.engine
        session_id, req = uuid.uuid4().hex, None
        client, turns, fair = self.client_of(request), 0, self.fair_turns()

        def done() -> None:  # the request's generations ended: their turns go back
            nonlocal turns
            for _ in range(turns):
                fair.release(client)
            turns = 0
        call.done = done
        try:
            if not _is_json(request):
                raise UnsupportedMediaType("the request body must be JSON (Content-Type: application/json)")
            req = parse(await request.body())
            if req.model not in (None, "", self.name):
                raise ModelNotFound(f"model {req.model!r} does not exist; this server serves {self.name!r}",
                                    param="model")
            choices = req.choices(req.sampling())
            self.check_size(len(choices), choices[0].max_new_tokens)
            for _ in choices:  # a turn per generation, waited for here (no thread held meanwhile)
                await fair.acquire(client)
                turns += 1
            for i, sampling in enumerate(choices):
                sid = session_id if i == 0 else f"{session_id}.{i}"
                # validation, context fit and the generation run on the stream's own thread
                call.streams.append(ThreadedStream(lambda s=sampling, sid=sid: open_stream(req, s, sid)))
                call.sessions.append(sid)
            for stream in call.streams:
                call.firsts.append(await watching(request, lambda: call.cancel(engine), stream.take()))
        except EngineError as exc:
            call.cancel(engine)
            done()
            return self.error(req.in_request_terms(exc) if req is not None and isinstance(exc, InvalidRequest)
                              else exc, session_id, call.path)
        except BaseException:
            call.cancel(engine)
            done()
            raise
        cid, created = f"{call.prefix}-{session_id}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(self, call, cid, created, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(self, call, cid, created, request)


def server_of(request: Request) -> ServerContext:
    return request.app.state.server


async def watching(request: Request, on_disconnect: Callable[[], Any], step: Any) -> Any:
    """Await `step` (a coroutine); if the client hangs up meanwhile, call `on_disconnect`."""
    task = asyncio.ensure_future(step)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                on_disconnect()
                return await task  # the stream ends soon after a cancel
    finally:
        if not task.done():
            task.cancel()


def _is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
