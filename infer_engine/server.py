"""OpenAI-compatible HTTP server over any Engine.

    python -m infer_engine.server --model-path models/tiny-chat --port 23333 [--api-key KEY]

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions and POST
/v1/completions (SSE when "stream": true; `n` choices). Errors use OpenAI's JSON shape with
400/401/404/413/415. A client that disconnects cancels its generations.
Every request is one log line (loguru): status, session, tokens, time to first token, finish.

As one replica of several: `--proxy-url http://PROXY:8000` registers the server with LMDeploy's
request router (`lmdeploy serve proxy`) once it listens, as LMDeploy's own api_server does, and
takes it off again on a clean exit; the proxy's heartbeat (GET /health) drops a replica that
died.
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
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from .aio import ThreadedStream
from .asgi import RequestLimits
from .base import Delta, Engine, Usage, check_messages
from .errors import AuthenticationFailed, EngineError, InvalidRequest, ModelNotFound, UnsupportedMediaType
from .protocol import ChatCompletionRequest, CompletionRequest, error_body, parse_completion_request, parse_request
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
    proxy_url: str = field(default="", metadata=_help(
        "register with this LMDeploy proxy (lmdeploy serve proxy) as one of its replicas"))
    public_url: str = field(default="", metadata=_help(
        "where the proxy reaches this server (default http://HOST:PORT; HOST 0.0.0.0: this machine's name)"))

    def node_url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return (self.public_url or f"http://{host}:{self.port}").rstrip("/")

    def validate(self) -> "ServerSettings":
        for name in ("proxy_url", "public_url"):
            if getattr(self, name) and not getattr(self, name).startswith(("http://", "https://")):
                raise InvalidRequest(f"{name} must be an http(s) URL, got {getattr(self, name)!r}", param=name)
        if not 0 < self.port < 65536:
            raise InvalidRequest(f"port must be in 1..65535, got {self.port}", param="port")
        if not self.max_body_mb > 0:
            raise InvalidRequest(f"max_body_mb must be > 0, got {self.max_body_mb}", param="max_body_mb")
        return self


def _usage_json(usages: list[Usage]) -> dict:
    """OpenAI's usage, exactly its fields: the prompt once, the completions of all choices."""
    prompt, completion = usages[0].prompt_tokens, sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings_json(u: Usage) -> dict:
    """Our timing figures (first choice), beside usage rather than in it (llama.cpp's place)."""
    return {"ttft_s": u.ttft_s, "decode_tokens_per_s": u.decode_tokens_per_s}


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


def _is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


@dataclass
class _Call:
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


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = int(ServerSettings.max_body_mb * 2**20)) -> FastAPI:
    name = model_name or engine.model_name
    app = FastAPI(title="infer_engine OpenAI-compatible server", docs_url=None, redoc_url=None,
                  openapi_url=None, middleware=[Middleware(RequestLimits, max_bytes=max_body_bytes)])

    def error(exc: EngineError, session: str = "-", path: str = "/v1/chat/completions") -> JSONResponse:
        logger.info("{} {} session={} error={!r}", path, exc.status, session, exc.message)
        return JSONResponse(error_body(exc), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: " + (
            "no such endpoint" if exc.status_code == 404 else str(exc.detail).lower())
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    def unauthorized(request: Request) -> JSONResponse | None:
        if not api_key:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return None
        return error(AuthenticationFailed("invalid or missing API key (Authorization: Bearer ...)"),
                     path=request.url.path)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "infer_engine"}

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        if (denied := unauthorized(request)) is not None:
            return denied
        if model_id != name:
            return error(ModelNotFound(f"The model {model_id!r} does not exist; this server serves {name!r}",
                                       param="model"), path=request.url.path)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def start(request: Request, call: _Call, parse: Callable[[bytes], Any],
                    open_stream: Callable[[Any, Any, str], Any]) -> Any:
        """Parse, check and start the request's n generations; their first items are awaited
        here, so what fails before the first token is an HTTP error, not a broken stream."""
        if (denied := unauthorized(request)) is not None:
            return denied
        session_id, req = uuid.uuid4().hex, None
        try:
            if not _is_json(request):
                raise UnsupportedMediaType("the request body must be JSON (Content-Type: application/json)")
            req = parse(await request.body())
            if req.model not in (None, "", name):
                raise ModelNotFound(f"model {req.model!r} does not exist; this server serves {name!r}",
                                    param="model")
            for i, sampling in enumerate(req.choices(req.sampling())):
                sid = session_id if i == 0 else f"{session_id}.{i}"
                # validation, context fit and the generation run on the stream's own thread
                call.streams.append(ThreadedStream(lambda s=sampling, sid=sid: open_stream(req, s, sid)))
                call.sessions.append(sid)
            for stream in call.streams:
                call.firsts.append(await _watching(request, lambda: call.cancel(engine), stream.take()))
        except EngineError as exc:
            call.cancel(engine)
            return error(req.in_request_terms(exc) if req is not None else exc, session_id, call.path)
        cid, created = f"{call.prefix}-{session_id}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(engine, call, cid, created, name, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(engine, call, cid, created, name, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        def open_stream(req: ChatCompletionRequest, sampling: Any, sid: str) -> Any:
            final = req.continue_final
            return engine.stream_chat(check_messages(req.messages, final), sampling, sid, final)
        return await start(request, _Call("/v1/chat/completions", "chat.completion", "chatcmpl", True),
                           parse_request, open_stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        def open_stream(req: CompletionRequest, sampling: Any, sid: str) -> Any:
            return engine.stream_completion(req.text, sampling, sid)
        return await start(request, _Call("/v1/completions", "text_completion", "cmpl", False),
                           parse_completion_request, open_stream)

    return app


def _log_done(path: str, session_id: str, status: int, usage: Usage | None, stream: bool, note: str = "") -> None:
    if usage is None:
        logger.info("POST {} {} session={} stream={} {}", path, status, session_id[:12], stream, note)
        return
    ttft = "-" if usage.ttft_s is None else f"{usage.ttft_s * 1000:.0f}ms"
    logger.info("POST {} {} session={} stream={} prompt_tokens={} completion_tokens={} "
                "ttft={} finish={} {}", path, status, session_id[:12], stream, usage.prompt_tokens,
                usage.completion_tokens, ttft, usage.finish_reason, note)


async def _collect(stream: ThreadedStream, first: list[Delta]) -> tuple[str, Usage]:
    parts, usage, items = [], Usage(), first
    while items:
        for delta in items:
            parts.append(delta.text)
            usage = delta.usage or usage
        items = await stream.take()
    return "".join(parts), usage


async def _complete(engine: Engine, call: _Call, cid: str, created: int, name: str, request: Request) -> Any:
    try:
        done = await _watching(request, lambda: call.cancel(engine), asyncio.gather(
            *(_collect(s, f) for s, f in zip(call.streams, call.firsts))))
    except EngineError as exc:
        call.cancel(engine)
        _log_done(call.path, call.sessions[0], exc.status, None, False, f"error={exc.message!r}")
        return JSONResponse(error_body(exc), status_code=exc.status)
    usages = [u for _, u in done]
    _log_done(call.path, call.sessions[0], 200, usages[0], False)
    if call.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": u.finish_reason} for i, (text, u) in enumerate(done)]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": u.finish_reason}
                   for i, (text, u) in enumerate(done)]
    return {"id": cid, "object": call.obj, "created": created, "model": name, "choices": choices,
            "usage": _usage_json(usages), "timings": _timings_json(usages[0])}


async def _sse(engine: Engine, call: _Call, cid: str, created: int, name: str,
               include_usage: bool) -> AsyncIterator[str]:
    """One chunk per batch of deltas of a choice: when the loop is busy, what arrived meanwhile
    goes out together instead of one write per token. Each choice ends with one chunk carrying
    its finish_reason; usage (if asked) and [DONE] come after all of them, errors included."""
    obj = f"{call.obj}.chunk" if call.chat else call.obj

    def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if call.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": cid, "object": obj, "created": created, "model": name, "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        items, usage = call.firsts[i], None
        try:
            while items:
                await queue.put((i, items, None))
                usage = next((d.usage for d in reversed(items) if d.usage), usage)
                items = await call.streams[i].take()
            await queue.put((i, None, usage or Usage()))
        except EngineError as exc:
            await queue.put((i, exc, None))

    usages: list[Usage | None] = [None] * len(call.streams)
    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(call.streams))]
    finished, failed = False, None
    try:
        if call.chat:
            for i in range(len(call.streams)):
                yield chunk(i, None, role=True)
        left = len(call.streams)
        while left:
            i, items, usage = await queue.get()
            if isinstance(items, EngineError):  # a generation failed mid-stream: say so, end it
                failed, left = items, left - 1
                call.cancel(engine)
                continue
            if items is None:
                usages[i], left = usage, left - 1
                yield chunk(i, None, usage.finish_reason)
                continue
            text = "".join(d.text for d in items)
            if text:
                yield chunk(i, text)
        if failed is not None:
            yield f"data: {json.dumps(error_body(failed))}\n\n"
        elif include_usage:
            done = [u or Usage() for u in usages]
            body = {"id": cid, "object": obj, "created": created, "model": name, "choices": [],
                    "usage": _usage_json(done), "timings": _timings_json(done[0])}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        finished = True
        _log_done(call.path, call.sessions[0], 200, usages[0], True,
                  f"error={failed.message!r}" if failed else "")
    finally:
        for task in tasks:
            task.cancel()
        if not finished:  # the client went away: the streams' threads then drain them
            call.cancel(engine)
            _log_done(call.path, call.sessions[0], 200, usages[0], True, "client disconnected")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxyRegistration:
    """This server as a replica behind LMDeploy's proxy: POST /nodes/add once the server
    listens (with its model, so the proxy need not call back with an API key), retried while
    the proxy is not up yet; POST /nodes/remove on a clean exit."""

    def __init__(self, proxy_url: str, node_url: str, model: str, timeout_s: float = 120.0):
        self.proxy_url, self.node_url, self.model, self.timeout_s = proxy_url.rstrip("/"), node_url, model, timeout_s
        self.registered = threading.Event()
        self._stop = threading.Event()

    def _post(self, path: str, body: dict) -> None:
        import urllib.request

        req = urllib.request.Request(self.proxy_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode(errors="replace")
        if "error_code" in text:  # the proxy answers 200 with its own error object
            raise OSError(text.strip())

    def start(self, ready: Callable[[], bool] = lambda: True) -> None:
        threading.Thread(target=self._register, args=(ready,), daemon=True, name="proxy-registration").start()

    def _register(self, ready: Callable[[], bool]) -> None:
        while not ready() and not self._stop.wait(0.05):
            pass
        deadline, wait, last = time.monotonic() + self.timeout_s, 0.5, None
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._post("/nodes/add", {"url": self.node_url, "status": {"models": [self.model]}})
                self.registered.set()
                logger.info("registered {} ({}) with the proxy at {}", self.node_url, self.model, self.proxy_url)
                return
            except OSError as exc:  # not up yet, or refused: try again
                last = exc
            self._stop.wait(wait)
            wait = min(wait * 2, 5.0)
        if not self._stop.is_set():
            logger.error("could not register {} with the proxy at {}: {}", self.node_url, self.proxy_url, last)

    def stop(self) -> None:
        self._stop.set()
        if self.registered.is_set():
            try:
                self._post("/nodes/remove", {"url": self.node_url})
                logger.info("left the proxy at {}", self.proxy_url)
            except OSError as exc:
                logger.warning("could not leave the proxy at {}: {}", self.proxy_url, exc)


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
        registration = ProxyRegistration(server.proxy_url, server.node_url(),
                                         server.served_model_name or engine.model_name) if server.proxy_url else None
        config = uvicorn.Config(app, host=server.host, port=server.port, log_level="info", access_log=False)
        uv = uvicorn.Server(config)
        if registration is not None:
            registration.start(ready=lambda: uv.started)  # registers once the socket listens
        try:
            uv.run()
        finally:
            if registration is not None:
                registration.stop()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
