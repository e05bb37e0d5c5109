"""What every route of the server shares: the engine and the served name, the API key check,
OpenAI-shaped errors, and starting a request's generations (the part of an endpoint before its
first token, after which streaming.py answers)."""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger

from ..aio import ThreadedStream
from ..base import Delta, Engine
from ..errors import AuthenticationFailed, EngineError, ModelNotFound, UnsupportedMediaType
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

    def cancel(self, engine: Engine) -> None:
        """Stop every generation of this request (a client gone, one choice failed)."""
        for sid in self.sessions:
            engine.cancel(sid)


@dataclass
class ServerContext:
    engine: Engine
    name: str                        # the model id clients name
    api_key: str | None = None
    stream_interval_s: float = 0.0   # a streamed choice's chunks at most this often (0: as they come)

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
        try:
            if not _is_json(request):
                raise UnsupportedMediaType("the request body must be JSON (Content-Type: application/json)")
            req = parse(await request.body())
            if req.model not in (None, "", self.name):
                raise ModelNotFound(f"model {req.model!r} does not exist; this server serves {self.name!r}",
                                    param="model")
            for i, sampling in enumerate(req.choices(req.sampling())):
                sid = session_id if i == 0 else f"{session_id}.{i}"
                # validation, context fit and the generation run on the stream's own thread
                call.streams.append(ThreadedStream(lambda s=sampling, sid=sid: open_stream(req, s, sid)))
                call.sessions.append(sid)
            for stream in call.streams:
                call.firsts.append(await watching(request, lambda: call.cancel(engine), stream.take()))
        except EngineError as exc:
            call.cancel(engine)
            return self.error(req.in_request_terms(exc) if req is not None else exc, session_id, call.path)
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
