"""OpenAI-compatible HTTP server over any Engine.

    python -m infer_engine.server --model-path models/tiny-chat --port 23333 [--api-key KEY]

Endpoints (one module each under routes/): GET /v1/models, GET /v1/models/{id}, POST
/v1/chat/completions and POST /v1/completions (SSE when "stream": true; `n` choices), GET
/health. Errors use OpenAI's JSON shape with 400/401/404/413/415. A client that disconnects
cancels its generations. Every request is one log line (loguru): status, session, tokens, time
to first token, finish.

    settings.py   ServerSettings (SERVER_* env vars, flags)
    context.py    what the routes share: the engine, the API key check, errors, starting a request
    streaming.py  a started request answered: one completion, or SSE chunks
    routes/       the endpoints
    proxy.py      registration with LMDeploy's request router (`--proxy-url`)
    background.py the server in a thread (tests, benchmarks)

As one replica of several: `--proxy-url http://PROXY:8000` registers the server with LMDeploy's
request router (`lmdeploy serve proxy`) once it listens, as LMDeploy's own api_server does, and
takes it off again on a clean exit; the proxy's heartbeat (GET /health) drops a replica that
died.
"""
from __future__ import annotations

import argparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from .. import connections
from ..asgi import RequestLimits
from ..base import Engine
from ..errors import EngineError
from ..settings import add_dataclass_arguments, add_engine_arguments, dataclass_from_args, settings_from_args
from .background import BackgroundServer, free_port
from .context import ServerContext
from .proxy import ProxyRegistration
from .routes import ROUTERS
from .settings import SERVER_ENV_PREFIX, ServerSettings

__all__ = ["BackgroundServer", "ProxyRegistration", "ServerSettings", "create_app", "free_port", "main",
           "parse_server_settings"]


def create_app(engine: Engine, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = int(ServerSettings.max_body_mb * 2**20),
               stream_interval_ms: float = 0.0, max_request_tokens: int = ServerSettings.max_request_tokens,
               client_share: int = 0) -> FastAPI:
    app = FastAPI(title="infer_engine OpenAI-compatible server", docs_url=None, redoc_url=None,
                  openapi_url=None, middleware=[Middleware(RequestLimits, max_bytes=max_body_bytes)])
    app.state.server = ServerContext(engine, model_name or engine.model_name, api_key, stream_interval_ms / 1000,
                                     max_request_tokens, client_share)
    for router in ROUTERS:
        app.include_router(router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: " + (
            "no such endpoint" if exc.status_code == 404 else str(exc.detail).lower())
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    return app


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

    from ..factory import create_engine
    try:
        server, settings = parse_server_settings(argv)
        engine = create_engine(settings)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(engine, server.api_key or None, server.served_model_name or None,
                         int(server.max_body_mb * 2**20), server.stream_interval_ms, server.max_request_tokens,
                         server.client_share)
        logger.info("serving {} ({}) on http://{}:{}/v1", engine.model_name, settings.backend,
                    server.host, server.port)
        registration = ProxyRegistration(server.proxy_url, server.node_url(),
                                         server.served_model_name or engine.model_name) if server.proxy_url else None
        connections.install()  # a head timeout and a per-client connection cap (slowloris, file limits)
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
