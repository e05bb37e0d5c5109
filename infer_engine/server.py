"""OpenAI-compatible HTTP server over any Engine.

    python -m infer_engine.server --model-path models/tiny-chat --port 23333 [--api-key KEY]

Endpoints: GET /v1/models, POST /v1/chat/completions (SSE when "stream": true). Errors use
OpenAI's JSON shape with 400/401/404/413. A client that disconnects cancels its generation.
Every request is one log line (loguru): status, session, tokens, time to first token, finish.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger
from starlette.middleware import Middleware

from .aio import ThreadedStream
from .asgi import RequestLimits
from .base import Delta, Engine, Usage, check_messages
from .errors import AuthenticationFailed, EngineError, InvalidRequest, ModelNotFound
from .protocol import error_body, parse_request
from .settings import (add_dataclass_arguments, add_engine_arguments, dataclass_from_args,
                       settings_from_args)

SERVER_ENV_PREFIX = "SERVER_"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ServerSettings:
    host: str = field(default="127.0.0.1", metadata=_help("interface to listen on (0.0.0.0: all)"))
    port: int = field(default=23333, metadata=_help("port"))
    api_key: str = field(default="", metadata=_help("require 'Authorization: Bearer KEY' (empty: none)"))
    served_model_name: str = field(default="", metadata=_help("model id in /v1/models (default: folder name)"))
    max_body_mb: float = field(default=2.0, metadata=_help("largest request body accepted, in MB (413 above)"))

    def validate(self) -> "ServerSettings":
        if not 0 < self.port < 65536:
            raise InvalidRequest(f"port must be in 1..65535, got {self.port}", param="port")
        if not self.max_body_mb > 0:
            raise InvalidRequest(f"max_body_mb must be > 0, got {self.max_body_mb}", param="max_body_mb")
        return self


def _usage_json(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "ttft_s": u.ttft_s,
            "decode_tokens_per_s": u.decode_tokens_per_s}


async def _watching(request: Request, on_disconnect: Callable[[], Any], step: Any) -> Any:
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


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = int(ServerSettings.max_body_mb * 2**20)) -> FastAPI:
    name = model_name or engine.model_name
    app = FastAPI(title="infer_engine OpenAI-compatible server",
                  middleware=[Middleware(RequestLimits, max_bytes=max_body_bytes)])

    def error(exc: EngineError, session: str = "-") -> JSONResponse:
        logger.info("POST /v1/chat/completions {} session={} error={!r}", exc.status, session, exc.message)
        return JSONResponse(error_body(exc), status_code=exc.status)

    def unauthorized(request: Request) -> JSONResponse | None:
        if not api_key:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return None
        return error(AuthenticationFailed("invalid or missing API key (Authorization: Bearer ...)"))

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "infer_engine"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        session_id, req = uuid.uuid4().hex, None
        try:
            req = parse_request(await request.body())
            if req.model not in (None, "", name):
                raise ModelNotFound(f"model {req.model!r} does not exist; this server serves {name!r}",
                                    param="model")
            if req.n not in (None, 1):
                raise InvalidRequest("only n=1 is supported", param="n")
            messages = check_messages(req.messages)
            sampling = req.sampling()
            # Validation, context fit and the generation all run on the stream's own thread;
            # what fails before the first token is an HTTP error, not a broken stream.
            stream = ThreadedStream(lambda: engine.stream_chat(messages, sampling, session_id))
            first = await _watching(request, lambda: engine.cancel(session_id), stream.take())
        except EngineError as exc:
            return error(req.in_request_terms(exc) if req is not None else exc, session_id)
        cid, created = f"chatcmpl-{session_id}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(engine, stream, first, session_id, cid, created, name, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(engine, stream, first, session_id, cid, created, name, request)

    return app


def _log_done(session_id: str, status: int, usage: Usage | None, stream: bool, note: str = "") -> None:
    if usage is None:
        logger.info("POST /v1/chat/completions {} session={} stream={} {}", status, session_id[:12],
                    stream, note)
        return
    ttft = "-" if usage.ttft_s is None else f"{usage.ttft_s * 1000:.0f}ms"
    logger.info("POST /v1/chat/completions {} session={} stream={} prompt_tokens={} completion_tokens={} "
                "ttft={} finish={} {}", status, session_id[:12], stream, usage.prompt_tokens,
                usage.completion_tokens, ttft, usage.finish_reason, note)


async def _complete(engine: Engine, stream: ThreadedStream, first: list, session_id: str, cid: str,
                    created: int, name: str, request: Request) -> Any:
    async def collect() -> tuple[str, Usage]:
        parts, usage, items = [], Usage(), first
        while items:
            for delta in items:
                parts.append(delta.text)
                usage = delta.usage or usage
            items = await stream.take()
        return "".join(parts), usage

    try:
        text, usage = await _watching(request, lambda: engine.cancel(session_id), collect())
    except EngineError as exc:
        _log_done(session_id, exc.status, None, False, f"error={exc.message!r}")
        return JSONResponse(error_body(exc), status_code=exc.status)
    _log_done(session_id, 200, usage, False)
    return {"id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": usage.finish_reason}],
            "usage": _usage_json(usage)}


async def _sse(engine: Engine, stream: ThreadedStream, first: list[Delta], session_id: str, cid: str,
               created: int, name: str, include_usage: bool) -> AsyncIterator[str]:
    """One chunk per batch of deltas: when the loop is busy, what arrived meanwhile goes out
    together instead of one write per token."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    finished, usage = False, None
    try:
        yield chunk({"role": "assistant", "content": ""})
        items = first
        while items:
            text = "".join(d.text for d in items)
            if text:
                yield chunk({"content": text})
            usage = next((d.usage for d in reversed(items) if d.usage), usage)
            items = await stream.take()
        usage = usage or Usage()
        yield chunk({}, usage.finish_reason)
        if include_usage:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [], "usage": _usage_json(usage)}
            yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
        finished = True
        _log_done(session_id, 200, usage, True)
    except EngineError as exc:  # the generation failed mid-stream: say so, then end the stream
        yield f"data: {json.dumps(error_body(exc))}\n\n"
        yield "data: [DONE]\n\n"
        finished = True
        _log_done(session_id, 200, usage, True, f"error={exc.message!r}")
    finally:
        if not finished:  # the client went away: the stream's thread then drains it
            engine.cancel(session_id)
            _log_done(session_id, 200, usage, True, "client disconnected")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a daemon thread (tests, benchmarks)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def parse_server_settings(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="OpenAI-compatible server over any engine backend")
    add_dataclass_arguments(parser, ServerSettings, SERVER_ENV_PREFIX, "server")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    server = dataclass_from_args(ServerSettings, args, None, SERVER_ENV_PREFIX).validate()
    return server, settings_from_args(args)


def main(argv: list[str] | None = None) -> int:
    import sys

    import uvicorn

    from .factory import create_engine
    try:
        server, settings = parse_server_settings(argv)
        engine = create_engine(settings)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(engine, server.api_key or None, server.served_model_name or None,
                         int(server.max_body_mb * 2**20))
        logger.info("serving {} ({}) on http://{}:{}/v1", engine.model_name, settings.backend,
                    server.host, server.port)
        uvicorn.run(app, host=server.host, port=server.port, log_level="info", access_log=False)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
