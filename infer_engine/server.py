"""OpenAI-compatible HTTP server over any Engine.

    python -m infer_engine.server --model-path models/tiny-chat --port 23333 [--api-key KEY]

Endpoints: GET /v1/models, POST /v1/chat/completions (SSE when "stream": true). Errors use
OpenAI's JSON shape with 400/401/404. A client that disconnects cancels its generation.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .base import Engine, Usage, check_messages
from .errors import AuthenticationFailed, EngineError, InvalidRequest, ModelNotFound
from .settings import SamplingParams, add_engine_arguments, settings_from_args

_END = object()
# request field -> SamplingParams field (OpenAI names plus the extensions vLLM/LMDeploy accept)
_SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repetition_penalty", "stop": "stop", "seed": "seed",
                    "ignore_eos": "ignore_eos"}


def sampling_from_request(body: dict) -> SamplingParams:
    """Map an OpenAI request body onto SamplingParams; bad values raise InvalidRequest naming
    the request field."""
    params = SamplingParams()
    for key, attr in _SAMPLING_FIELDS.items():
        if body.get(key) is not None:
            setattr(params, attr, body[key])
    try:
        return params.validate()
    except InvalidRequest as exc:
        names = [k for k, v in _SAMPLING_FIELDS.items() if v == exc.param and k in body]
        param = names[0] if names else exc.param
        raise InvalidRequest(exc.message.replace(exc.param, param, 1), param=param) from None


def _error_body(exc: EngineError) -> dict:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                      "code": exc.status}}


def _usage_json(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "ttft_s": u.ttft_s,
            "decode_tokens_per_s": u.decode_tokens_per_s}


async def _aiter(gen: Iterator) -> AsyncIterator:
    """Iterate a blocking generator from async code. Each stream gets its own pump thread (not
    the bounded default executor, where 64 streams waiting for tokens would starve each other);
    the pump runs the generator to its end, so its cleanup always happens."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def pump() -> None:
        try:
            for item in gen:
                put(item)
            put(_END)
        except BaseException as exc:  # surfaced in the request's task
            put(exc)

    threading.Thread(target=pump, daemon=True, name="sse-pump").start()
    while True:
        item = await queue.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None) -> FastAPI:
    name = model_name or engine.model_name
    app = FastAPI(title="infer_engine OpenAI-compatible server")

    def error(exc: EngineError) -> JSONResponse:
        return JSONResponse(_error_body(exc), status_code=exc.status)

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
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            return error(InvalidRequest("request body is not valid JSON"))
        try:
            if not isinstance(body, dict):
                raise InvalidRequest("request body must be a JSON object")
            if body.get("model") not in (None, "", name):
                raise ModelNotFound(f"model {body['model']!r} does not exist; this server serves {name!r}",
                                    param="model")
            if body.get("n", 1) != 1:
                raise InvalidRequest("only n=1 is supported", param="n")
            messages = check_messages(body.get("messages"))
            sampling = sampling_from_request(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise InvalidRequest("stream must be a boolean", param="stream")
            session_id = uuid.uuid4().hex
            # stream_chat validates and may raise (e.g. context overflow) before any output
            gen = await asyncio.to_thread(engine.stream_chat, messages, sampling, session_id)
        except EngineError as exc:
            return error(exc)
        cid, created = f"chatcmpl-{session_id}", int(time.time())
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(engine, gen, session_id, cid, created, name, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(engine, gen, session_id, cid, created, name, request)

    return app


async def _complete(engine: Engine, gen: Iterator, session_id: str, cid: str, created: int,
                    name: str, request: Request) -> Any:
    async def collect() -> tuple[str, Usage]:
        parts, usage = [], Usage()
        async for delta in _aiter(gen):
            parts.append(delta.text)
            usage = delta.usage or usage
        return "".join(parts), usage

    task = asyncio.ensure_future(collect())
    try:
        while not task.done():  # a client that hangs up cancels the generation
            await asyncio.wait({task}, timeout=0.2)
            if not task.done() and await request.is_disconnected():
                engine.cancel(session_id)
        text, usage = task.result()
    except EngineError as exc:
        return JSONResponse(_error_body(exc), status_code=exc.status)
    finally:
        if not task.done():
            engine.cancel(session_id)
    return {"id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": usage.finish_reason}],
            "usage": _usage_json(usage)}


async def _sse(engine: Engine, gen: Iterator, session_id: str, cid: str, created: int, name: str,
               include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        usage = Usage()
        async for delta in _aiter(gen):
            if delta.text:
                yield chunk({"content": delta.text})
            usage = delta.usage or usage
        yield chunk({}, usage.finish_reason)
        if include_usage:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [], "usage": _usage_json(usage)}
            yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
        finished = True
    except EngineError as exc:
        yield f"data: {json.dumps(_error_body(exc))}\n\n"
        finished = True
    finally:
        if not finished:  # the client went away: the pump thread then drains the stream
            engine.cancel(session_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a daemon thread (tests, benchmarks)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible server over any engine backend")
    parser.add_argument("--host", default=os.environ.get("SERVER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SERVER_PORT", "23333")))
    parser.add_argument("--api-key", default=os.environ.get("SERVER_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' (env SERVER_API_KEY)")
    parser.add_argument("--served-model-name", default=None, help="model id shown in /v1/models")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)

    import uvicorn

    from .factory import create_engine
    engine = create_engine(settings)
    try:
        uvicorn.run(create_app(engine, args.api_key, args.served_model_name), host=args.host,
                    port=args.port, log_level="info")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
